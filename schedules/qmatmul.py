"""Quantized dense layers: W8A8, and group-wise int4 weights (W4A16, W4A8), for CPUs and GPUs.

The weights stay in the packed form of compiler/compress/quant.py: int8 per output channel
with float32 scales, or int4 two per byte (low nibble = even input) with one float16 scale per
(output channel, group of inputs). Kernels unpack next to the multiply and follow the
simulation's arithmetic:
- W8A8 and W4A8 sum the integer products exactly, then scale in the simulation's order, so
  they equal it bit for bit (the bias is added by the caller: fused, LLVM would contract the
  last multiply and the add into one FMA and differ in the last bit);
- W4A16 multiplies float32 activations by the dequantized weight q·s: the same values as the
  simulation, summed in another order.

CPU layout: panels of LANES output channels, like schedules/matmul.py — int8 P×K×LANES (x86 and
ARM W8A8: P×K/d×LANES×d runs of inputs for the dot instruction), or
bytes P×K/2×LANES with scales P×G×LANES. GPU layout: int8 K×O or bytes K/2×O with scales G×O,
so consecutive threads read consecutive channels. On GPUs, W8A8 is an int8 Relax matmul and
W4A16 a TIR block named "dequantize" feeding a plain matmul (DLight's matmul and GEMV rules
inline it and schedule both); W4A8 is one thread per output.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from tvm import te
from tvm.script import tirx as T

from compiler.errors import UserError
from schedules.matmul import LANES, few_rows_body, pack_weight, row_tile
from schedules.packing import pack_dp4a  # noqa: F401  (re-exported: numpy-only, see schedules/packing.py)


def check_group(K: int, group: int):
    if group <= 0 or group % 2 or K % group:
        raise UserError(f"int4 group size {group} must be even and divide the layer's {K} inputs")


def pack_int4(qweight: np.ndarray, scales: np.ndarray, gpu: bool = False):
    """The simulation's uint8 O×K/2 and float16 O×G → the kernel layout (see the module doc)."""
    O = qweight.shape[0]
    if gpu:
        return np.ascontiguousarray(qweight.T), np.ascontiguousarray(scales.T)
    if O % LANES:
        raise ValueError(f"{O} output channels are not a multiple of {LANES}")
    panels = lambda a: np.ascontiguousarray(a.reshape(O // LANES, LANES, -1).transpose(0, 2, 1))  # noqa: E731
    return panels(qweight), panels(scales)


def low_nibble(byte):
    """Signed low nibble of an int32 in [0, 255], without shifts into the sign bit (TIR or TE)."""
    return (byte & 15) - ((byte & 8) << 1)


def high_nibble(byte):
    return (byte >> 4) - ((byte & 128) >> 3)


def chunk(K: int) -> int:
    """Run of inputs, dividing K, whose int8·int8 sum is exact in float32 (1024 · 127² < 2²⁴):
    all of K up to 1024, else at most 256. Measured on d16 shapes, four runs of 1024 (or of 256)
    took 1.6× the time of one run or of sixteen, which LLVM unrolls differently."""
    if K <= 1024:
        return K
    return max(d for d in range(1, 257) if K % d == 0)


@lru_cache(maxsize=None)  # one parse per shape
def dense_quant(M: int, K: int, O: int, scheme: str, group: int | None = None):
    """CPU kernel of a quantized dense layer; `scheme` "w8a8", "w4a16" or "w4a8".

    Arguments: w8a8 (x int8 M×K, sx M×1, w int8 P×K×L, sw f32 O, b) → y without bias;
    w4a16 (x f32 M×K, sx 1×1 unused, w uint8 P×K/2×L, ws f16 P×G×L, b O) → y + b;
    w4a8 (x int8 M×K, sx M×1, w uint8 P×K/2×L, ws f16 P×G×L, b) → y without bias.

    Each parallel task converts one panel of weights to float32 once (raw integers, or
    dequantized for w4a16) and runs it against every row tile, so unpacking costs one pass over
    the weights, not one per row tile. Integer activations are converted once to float32, and
    FMA on integer-valued floats sums a run
    of products (a group, or `chunk(K)` inputs) exactly and at fp32 speed; runs are then
    combined in int32 (w8a8) or float64 (w4a8, times the group scale). x86 and ARM builds run
    W8A8 and W4A8 on the CPU's integer dot product instead (dense_dot)."""
    if O % LANES:
        raise ValueError(f"{O} output channels are not a multiple of {LANES}")
    four = scheme.startswith("w4")
    if four:
        check_group(K, group)
    P, L = O // LANES, LANES
    run = group if scheme == "w4a8" else chunk(K) if scheme == "w8a8" else K  # inputs summed exactly per run
    NR, G = K // run, K // group if four else 1
    mi = row_tile(M)
    R = M // mi
    i64 = T.int64
    act = "float32" if scheme == "w4a16" else "int8"
    wshape = (i64(P), i64(K // 2), i64(L)) if four else (i64(P), i64(K), i64(L))
    sshape = (i64(P), i64(G), i64(L)) if four else (i64(O),)
    sx_rows = 1 if scheme == "w4a16" else M
    acc_dtype = {"w8a8": "int32", "w4a8": "float64", "w4a16": "float32"}[scheme]

    @T.prim_func(private=True)
    def dense_q(x: T.Buffer((i64(M), i64(K)), act),
                sx: T.Buffer((i64(sx_rows), i64(1)), "float32"),
                wq: T.Buffer(wshape, "uint8" if four else "int8"),
                ws: T.Buffer(sshape, "float16" if four else "float32"),
                b: T.Buffer((i64(O),), "float32"),
                y: T.Buffer((i64(M), i64(O)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xf = T.decl_buffer((M, K), "float32")
        for i in T.parallel(M):
            for k in T.vectorized(K):
                xf[i, k] = T.Cast("float32", x[i, k])
        for p in T.parallel(P):
            wf = T.decl_buffer((K, L), "float32")
            byte = T.decl_buffer((L,), "int32", scope="local")  # a let in a vectorised loop keeps one lane
            if four:
                for k2 in range(K // 2):
                    for u in T.vectorized(L):
                        byte[u] = T.Cast("int32", wq[p, k2, u])
                        wf[2 * k2, u] = T.Cast("float32", low_nibble(byte[u]))
                        wf[2 * k2 + 1, u] = T.Cast("float32", high_nibble(byte[u]))
                    if scheme == "w4a16":
                        for u in T.vectorized(L):
                            wf[2 * k2, u] = wf[2 * k2, u] * T.Cast("float32", ws[p, 2 * k2 // group, u])
                            wf[2 * k2 + 1, u] = wf[2 * k2 + 1, u] * T.Cast("float32", ws[p, 2 * k2 // group, u])
            else:
                for k in range(K):
                    for u in T.vectorized(L):
                        wf[k, u] = T.Cast("float32", wq[p, k, u])
            for r in range(R):
                acc = T.decl_buffer((mi, L), acc_dtype, scope="local")
                part = T.decl_buffer((mi, L), "float32", scope="local")
                for ii in T.unroll(mi):
                    for u in T.vectorized(L):
                        acc[ii, u] = T.Cast(acc_dtype, 0)
                for g in range(NR):
                    for ii in T.unroll(mi):
                        for u in T.vectorized(L):
                            part[ii, u] = T.float32(0)
                    for k in range(run):
                        for ii in T.unroll(mi):
                            for u in T.vectorized(L):
                                part[ii, u] = part[ii, u] + xf[r * mi + ii, g * run + k] * wf[g * run + k, u]
                    for ii in T.unroll(mi):
                        for u in T.vectorized(L):
                            if scheme == "w4a8":
                                acc[ii, u] = acc[ii, u] + T.Cast("float64", part[ii, u]) * T.Cast("float64", ws[p, g, u])
                            else:
                                acc[ii, u] = acc[ii, u] + T.Cast(acc_dtype, part[ii, u])
                for ii in T.unroll(mi):
                    for u in T.vectorized(L):
                        if scheme == "w8a8":
                            y[r * mi + ii, p * L + u] = T.Cast("float32", acc[ii, u]) * sx[r * mi + ii, i64(0)] * ws[p * L + u]
                        elif scheme == "w4a8":
                            y[r * mi + ii, p * L + u] = T.Cast("float32", acc[ii, u]) * sx[r * mi + ii, i64(0)]
                        else:
                            y[r * mi + ii, p * L + u] = acc[ii, u] + b[p * L + u]

    return dense_q.with_attr("tirx.is_scheduled", True)


DOT_WIDTH = {"pmaddwd": 2, "vpdpbusd": 4, "sdot": 4, "dp4a": 4}   # inputs each instruction sums into one int32 lane
VNNI_OFFSET = 128   # vpdpbusd multiplies unsigned bytes by signed ones: weights are stored as w + 128


def dot_for(dot: str | None, K: int, group: int | None = None) -> str | None:
    """The CPU's integer dot product (targets.Board.int_dot: "vpdpbusd" on x86 with VNNI and
    "pmaddwd" on x86 with AVX2, int8 quads and int16 pairs; "sdot" on AArch64 with dotprod, int8
    quads) if a layer of K inputs (int4 groups of `group`) can use it, else None (the float
    kernel, dense_quant). int4 weights on a VNNI CPU take pmaddwd: VNNI's unsigned operand would
    need the nibbles offset and a correction per group."""
    if not dot:
        return None
    if dot == "vpdpbusd" and group is not None:
        dot = "pmaddwd"
    d = DOT_WIDTH[dot]
    return dot if K % d == 0 and (group is None or group % d == 0) else None


def cpu_dot(int_dot: str | None, scheme: str, K: int, group: int | None = None) -> str | None:
    """The integer dot product a CPU layer of `scheme` runs on: W8A8 and W4A8 where dot_for
    allows it, else None (dense_quant)."""
    return dot_for(int_dot, K, group) if scheme in ("w8a8", "w4a8") else None


def pack_cpu(scheme: str, qweight: np.ndarray, scales: np.ndarray, dot: str | None):
    """The simulation's packed weights → (weights, scales) in the layout of cpu_kernel's kernel."""
    if scheme == "w8a8":
        return (pack_int8_dot(qweight, dot) if dot else pack_weight(qweight)), scales
    return pack_int4(qweight, scales)


def cpu_kernel(M: int, K: int, O: int, scheme: str, group: int | None, dot: str | None):
    """The CPU kernel of a quantized layer, on `dot` (cpu_dot) or on FMAs."""
    return dense_dot(M, K, O, dot, group) if dot else dense_quant(M, K, O, scheme, group)


def pack_int8_dot(qweight: np.ndarray, dot: str) -> np.ndarray:
    """int8 O×K → P × K/d × LANES × d (d = DOT_WIDTH[dot]): for each run of d inputs, the d
    weights of each channel side by side, the operand layout of the dot instruction; for
    vpdpbusd the bytes of w + VNNI_OFFSET (1 … 255, read as unsigned)."""
    O, K = qweight.shape
    d = DOT_WIDTH[dot]
    if O % LANES or K % d:
        raise ValueError(f"{dot} packing needs O % {LANES} == 0 and K % {d} == 0, got {O}×{K}")
    if dot == "vpdpbusd":
        qweight = (qweight.astype(np.int16) + VNNI_OFFSET).astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(qweight.reshape(O // LANES, LANES, K // d, d).transpose(0, 2, 1, 3))


def nibble_word(byte, u, d: int):
    """One int32 holding the d signed nibbles of d/2 bytes (byte[j, u], low nibble first), each
    widened to 32/d bits: the d side-by-side weights one dot instruction reads for a channel."""
    bits = 32 // d
    word = 0
    for j in range(d):
        nib = low_nibble(byte[j // 2, u]) if j % 2 == 0 else high_nibble(byte[j // 2, u])
        word = word | ((nib & ((1 << bits) - 1)) << (bits * j))
    return word


def vnni_products(wu, x8, w0, x0, vl: int):
    """What vpdpbusd adds to vl int32 lanes: lane u sums unsigned weight bytes w0+4u … w0+4u+3
    times the signed activations x0 … x0+3 (the run every lane shares)."""
    terms = [T.Cast(f"int32x{vl}", wu[T.ramp(w0 + j, 4, vl)]) * T.broadcast(T.Cast("int32", x8[x0 + j]), vl)
             for j in range(4)]
    return terms[0] + terms[1] + terms[2] + terms[3]


@lru_cache(maxsize=None)  # one parse per shape
def dense_dot(M: int, K: int, O: int, dot: str, group: int | None = None, emulate: bool = False):
    """W8A8, or W4A8 with `group`, on the CPU's integer dot product, bit for bit the simulation
    (the int32 sums are its exact integer sums; W4A8 scales each group's sum in float64 like
    dense_quant). Arguments: W8A8 (x int8 M×K, sx M×1, w int8 P×K/d×LANES×d (pack_int8_dot),
    sw f32 O, b) → y without bias; W4A8 (x int8 M×K, sx M×1, w uint8 P×K/2×LANES (pack_int4),
    ws f16 P×G×LANES, b) → y without bias.

    - pmaddwd (x86 AVX2, which has no int8 dot product): multiplies 16 int16 pairs and adds each
      pair into an int32 lane, 16 multiply-adds per instruction where an fp32 FMA does 8.
      Activations, and one weight panel at a time, are widened to int16 once.
    - vpdpbusd (x86 AVX-VNNI, or AVX512-VNNI on 256-bit vectors): sums 4 products of an
      unsigned and a signed byte into each of 8 int32 lanes, and accumulates: 32 multiply-adds
      per instruction. The weights are the unsigned operand, stored as w + 128
      (pack_int8_dot), so each row's sum is Σ w·x + 128·Σ x: the kernel sums each activation
      row once and takes 128·Σ x off, exactly, in int32. emulate=True writes the instruction's
      sum out instead, so that a CPU without VNNI (this one) can check the rest bit for bit.
    - sdot (AArch64): sums 4 int8 products into each of 4 int32 lanes, and accumulates; W8A8
      reads the int8 activations and weights where they are.
    int4 weights are unpacked once per panel into the operand layout (nibble_word): the byte
    layout already holds each channel's inputs 2k and 2k+1 together.
    Each step broadcasts one run of d inputs of a row against the runs of 8 (pmaddwd) or 4
    (sdot) channels; a tile of `mi` rows × LANES channels stays in registers."""
    d = DOT_WIDTH[dot]
    four = group is not None
    if four:
        if dot == "vpdpbusd":
            raise ValueError("int4 weights take pmaddwd on a VNNI CPU (dot_for)")
        check_group(K, group)
        if group % d:
            raise UserError(f"int4 group size {group} is not a multiple of {dot}'s {d} inputs")
    P, L = O // LANES, LANES
    mi = row_tile(M)
    R, KD = M // mi, K // d
    GK = group // d if four else KD          # dot steps per group (W8A8: one group of all K)
    G = KD // GK
    vl = 4 if dot == "sdot" else 8          # int32 lanes per accumulator vector
    V = L // vl
    widen = dot == "pmaddwd"                 # operands widened to int16 first
    vnni = dot == "vpdpbusd"                 # unsigned weights: each row's sum corrected
    unpack = widen or four                   # weights copied per panel into the operand layout
    ev = f"{'int16' if widen else 'int8'}x{vl * d}"   # one operand vector
    i64 = T.int64
    intrin = T.llvm_lookup_intrinsic_id({"pmaddwd": "llvm.x86.avx2.pmadd.wd", "sdot": "llvm.aarch64.neon.sdot",
                                         "vpdpbusd": "llvm.x86.avx512.vpdpbusd.256"}[dot])
    wshape = (i64(P), i64(K // 2), i64(L)) if four else (i64(P), i64(KD), i64(L), i64(d))
    sshape = (i64(P), i64(G), i64(L)) if four else (i64(O),)

    @T.prim_func(private=True)
    def dense_q(x: T.Buffer((i64(M), i64(K)), "int8"),
                sx: T.Buffer((i64(M), i64(1)), "float32"),
                wq: T.Buffer(wshape, "uint8" if four else "int8"),
                ws: T.Buffer(sshape, "float16" if four else "float32"),
                b: T.Buffer((i64(O),), "float32"),
                y: T.Buffer((i64(M), i64(O)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        x8 = T.decl_buffer((M * K,), "int8", data=x.data)          # sdot reads the int8 operands in place
        w8 = T.decl_buffer((P * K * L,), "int8", data=wq.data)      # (W8A8)
        xs = T.decl_buffer((M * K if widen else 1,), "int16")       # pmaddwd: widened once
        wu = T.decl_buffer((P * K * L,), "uint8", data=wq.data)     # vpdpbusd's unsigned weights
        xsum = T.decl_buffer((M if vnni else 1,), "int32")          # vpdpbusd: Σ x of each row
        if widen:
            for i in T.parallel(M):
                for k in T.vectorized(K):
                    xs[i * K + k] = T.Cast("int16", x8[i * K + k])
        if vnni:
            for i in T.parallel(M):
                xsum[i] = 0
                for k in range(K):
                    xsum[i] = xsum[i] + T.Cast("int32", x8[i * K + k])
        for p in T.parallel(P):
            ww = T.decl_buffer((K * L if unpack else 1,), "int16" if widen else "int8")
            if four:
                words = T.decl_buffer((KD * L,), "int32", data=ww.data)
                byte = T.decl_buffer((d // 2, L), "int32", scope="local")  # a let in a vectorised loop keeps one lane
                for kd in range(KD):
                    for j in T.unroll(d // 2):
                        for u in T.vectorized(L):
                            byte[j, u] = T.Cast("int32", wq[p, kd * (d // 2) + j, u])
                    for u in T.vectorized(L):
                        words[kd * L + u] = nibble_word(byte, u, d)
            elif widen:
                for kd in range(KD):
                    for u in T.vectorized(d * L):
                        ww[kd * d * L + u] = T.Cast("int16", w8[p * K * L + kd * d * L + u])
            for r in range(R):
                acc = T.decl_buffer((mi * L,), "int32", scope="local")
                facc = T.decl_buffer((mi * L if four else 1,), "float64", scope="local")
                if four:
                    for ii in T.unroll(mi):
                        for u in T.vectorized(L):
                            facc[ii * L + u] = T.float64(0)
                for g in range(G):
                    for ii in T.unroll(mi):
                        for u in T.vectorized(L):
                            acc[ii * L + u] = 0
                    for kg in range(GK):
                        for ii in T.unroll(mi):
                            for v in T.unroll(V):
                                if widen:
                                    run = T.reinterpret(xs[T.ramp((r * mi + ii) * K + d * (g * GK + kg), 1, d)], dtype="int32")
                                    acc[T.ramp(ii * L + v * vl, 1, vl)] = acc[T.ramp(ii * L + v * vl, 1, vl)] + \
                                        T.call_llvm_pure_intrin(intrin, T.reinterpret(T.broadcast(run, vl), dtype=ev),
                                                                ww[T.ramp((g * GK + kg) * d * L + v * vl * d, 1, vl * d)],
                                                                dtype=f"int32x{vl}")
                                elif four:
                                    run = T.reinterpret(x8[T.ramp((r * mi + ii) * K + d * (g * GK + kg), 1, d)], dtype="int32")
                                    acc[T.ramp(ii * L + v * vl, 1, vl)] = T.call_llvm_pure_intrin(
                                        intrin, acc[T.ramp(ii * L + v * vl, 1, vl)],
                                        T.reinterpret(T.broadcast(run, vl), dtype=ev),
                                        ww[T.ramp((g * GK + kg) * d * L + v * vl * d, 1, vl * d)], dtype=f"int32x{vl}")
                                elif vnni and emulate:   # the instruction's sum, written out
                                    acc[T.ramp(ii * L + v * vl, 1, vl)] = acc[T.ramp(ii * L + v * vl, 1, vl)] + (
                                        vnni_products(wu, x8, p * K * L + kg * d * L + v * vl * d, (r * mi + ii) * K + d * kg, vl))
                                else:
                                    run = T.reinterpret(x8[T.ramp((r * mi + ii) * K + d * kg, 1, d)], dtype="int32")
                                    xv = T.reinterpret(T.broadcast(run, vl), dtype=ev)
                                    wv = w8[T.ramp(p * K * L + kg * d * L + v * vl * d, 1, vl * d)]
                                    acc[T.ramp(ii * L + v * vl, 1, vl)] = T.call_llvm_pure_intrin(
                                        intrin, acc[T.ramp(ii * L + v * vl, 1, vl)],
                                        wv if vnni else xv, xv if vnni else wv, dtype=f"int32x{vl}")
                    if four:
                        for ii in T.unroll(mi):
                            for u in T.vectorized(L):
                                facc[ii * L + u] = facc[ii * L + u] + \
                                    T.Cast("float64", acc[ii * L + u]) * T.Cast("float64", ws[p, g, u])
                for ii in T.unroll(mi):
                    for u in T.vectorized(L):
                        if four:
                            y[r * mi + ii, p * L + u] = T.Cast("float32", facc[ii * L + u]) * sx[r * mi + ii, i64(0)]
                        elif vnni:
                            y[r * mi + ii, p * L + u] = T.Cast("float32", acc[ii * L + u] - VNNI_OFFSET * xsum[r * mi + ii]) \
                                * sx[r * mi + ii, i64(0)] * ws[p * L + u]
                        else:
                            y[r * mi + ii, p * L + u] = T.Cast("float32", acc[ii * L + u]) * sx[r * mi + ii, i64(0)] * ws[p * L + u]

    return dense_q.with_attr("tirx.is_scheduled", True)


DP4A_TILE, DP4A_THREADS, DP4A_KW = 64, 16, 8   # outputs per block side, threads per side, int32 words per K step


@lru_cache(maxsize=None)
def dense_w8a8_dp4a(M: int, K: int, O: int):
    """CUDA W8A8 on dp4a (4 int8 products summed into an int32 per instruction): (x int8 M×K,
    sx M×1, w int8 K/4×O×4 (pack_dp4a), sw f32 O) → y without bias, the simulation's arithmetic.

    A block of 16×16 threads computes a 64×64 output tile, each thread 4×4 outputs spaced 16
    apart (so a warp's shared-memory reads and global writes are consecutive); each step stages
    8 words (32 inputs) of the activation rows and of the weight columns in shared memory.
    Edges are zero-filled, so M and O need not divide the tile (M is 2·pn² tokens)."""
    KW, T_, N, S = K // 4, DP4A_TILE, DP4A_THREADS, DP4A_KW
    R = T_ // N                                 # outputs per thread along each side
    steps = (KW + S - 1) // S
    loads = T_ * S // (N * N)                   # words each thread stages per tile and step
    i64 = T.int64

    @T.prim_func(private=True)
    def w8a8(x: T.Buffer((i64(M), i64(K)), "int8"),
             sx: T.Buffer((i64(M), i64(1)), "float32"),
             wq: T.Buffer((i64(KW), i64(O), i64(4)), "int8"),
             ws: T.Buffer((i64(O),), "float32"),
             y: T.Buffer((i64(M), i64(O)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xw = T.decl_buffer((M * KW,), "int32", data=x.data)
        ww = T.decl_buffer((KW * O,), "int32", data=wq.data)
        for by in T.thread_binding((M + T_ - 1) // T_, thread="blockIdx.y"):
            for bx in T.thread_binding((O + T_ - 1) // T_, thread="blockIdx.x"):
                for ty in T.thread_binding(N, thread="threadIdx.y"):
                    for tx in T.thread_binding(N, thread="threadIdx.x"):
                        xs = T.decl_buffer((T_ * S,), "int32", scope="shared")     # [row][word]
                        wsh = T.decl_buffer((S * T_,), "int32", scope="shared")    # [word][column]
                        acc = T.decl_buffer((R * R,), "int32", scope="local")
                        for a in T.unroll(R * R):
                            acc[a] = 0
                        for step in range(steps):
                            T.tvm_storage_sync("shared")
                            for l in T.unroll(loads):
                                e = (ty * N + tx) * loads + l
                                if by * T_ + e // S < M and step * S + e % S < KW:
                                    xs[e] = xw[(by * T_ + e // S) * KW + step * S + e % S]
                                else:
                                    xs[e] = 0
                                if step * S + e // T_ < KW and bx * T_ + e % T_ < O:
                                    wsh[e] = ww[(step * S + e // T_) * O + bx * T_ + e % T_]
                                else:
                                    wsh[e] = 0
                            T.tvm_storage_sync("shared")
                            for kk in T.unroll(S):
                                for i in T.unroll(R):
                                    for j in T.unroll(R):
                                        acc[i * R + j] = T.call_pure_extern(
                                            "int32", "__dp4a", xs[(i * N + ty) * S + kk], wsh[kk * T_ + j * N + tx], acc[i * R + j])
                        for i in T.unroll(R):
                            for j in T.unroll(R):
                                if by * T_ + i * N + ty < M and bx * T_ + j * N + tx < O:
                                    y[by * T_ + i * N + ty, bx * T_ + j * N + tx] = (
                                        T.Cast("float32", acc[i * R + j]) * sx[by * T_ + i * N + ty, i64(0)]
                                        * ws[bx * T_ + j * N + tx])

    return w8a8.with_attr("tirx.is_scheduled", True)


ROWS_DP4A = 200    # CUDA W8A8 layers of up to this many rows run dense_w8a8_dp4a_rows (VAR's scales
                   # 0–7 at batch 1): on an H200 it beat the tiled kernel at every row count
                   # measured, 2 to 200 (README, H100 and H200)


def dp4a(a, b, acc, bound: bool):
    """acc + the dot product of the four int8 lanes of int32 words a and b: CUDA's __dp4a, or
    (bound=False: the kernel's loops serial on a CPU) the same sum written out."""
    if bound:
        return T.call_pure_extern("int32", "__dp4a", a, b, acc)
    lane = lambda w, i: T.Cast("int32", T.Cast("int8", T.shift_right(w, 8 * i)))  # noqa: E731
    return acc + lane(a, 0) * lane(b, 0) + lane(a, 1) * lane(b, 1) + lane(a, 2) * lane(b, 2) + lane(a, 3) * lane(b, 3)


@lru_cache(maxsize=None)
def dense_w8a8_dp4a_rows(M: int, K: int, O: int, bound: bool = True, TX: int = 8, TY: int = 32, MT: int = 8):
    """dense_w8a8_dp4a for few rows, with its inputs and arithmetic: the 64×64 tiles of that
    kernel leave all but a few of their rows empty at VAR's first scales and walk K in one block
    per 64 columns. Here, as in matmul.dense_rows_gpu (matmul.few_rows_body), K is split between
    threads in int32 words of 4 inputs, each step one __dp4a, and the int32 partial sums meet in
    shared memory, so the sum is exact and the result the simulation's. bound=False: serial
    loops for tests."""
    KW = K // 4
    i64 = T.int64
    body = few_rows_body(M, KW, O, "int32", bound, TX, TY, MT)

    @T.prim_func(private=True)
    def w8a8(x: T.Buffer((i64(M), i64(K)), "int8"), sx: T.Buffer((i64(M), i64(1)), "float32"),
             wq: T.Buffer((i64(KW), i64(O), i64(4)), "int8"), ws: T.Buffer((i64(O),), "float32"),
             y: T.Buffer((i64(M), i64(O)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xw = T.decl_buffer((M * KW,), "int32", data=x.data)
        ww = T.decl_buffer((KW * O,), "int32", data=wq.data)
        body(y, lambda k, j: ww[k * O + j], lambda acc, i, k, wk: dp4a(xw[i * KW + k], wk, acc, bound),
             lambda j: T.int32(0), lambda tot, i, j: T.Cast("float32", tot) * sx[i, i64(0)] * ws[j])

    return w8a8.with_attr("tirx.is_scheduled", True)


def dequantize_gpu(K: int, O: int, group: int):
    """TE function (bytes K/2×O, scales G×O) → float32 K×O weight, in a block named
    "dequantize" so that FuseOps fuses it into the matmul after it and DLight inlines it."""
    check_group(K, group)

    def compute(wq, ws):
        def value(k, o):
            byte = wq[k // 2, o].astype("int32")
            q = te.if_then_else(k % 2 == 0, low_nibble(byte), high_nibble(byte))
            return q.astype("float32") * ws[k // group, o].astype("float32")  # float16 or float32 scales
        return te.compute((K, O), value, name="dequantize")

    return compute


@lru_cache(maxsize=None)
def dense_w4a8_gpu(M: int, K: int, O: int, group: int, threads: int = 128):
    """GPU W4A8: one thread per output (m, o), the arithmetic of the CPU kernel."""
    check_group(K, group)
    G, i64 = K // group, T.int64
    blocks = (M * O + threads - 1) // threads

    @T.prim_func(private=True)
    def w4a8(x: T.Buffer((i64(M), i64(K)), "int8"),
             sx: T.Buffer((i64(M), i64(1)), "float32"),
             wq: T.Buffer((i64(K // 2), i64(O)), "uint8"),
             ws: T.Buffer((i64(G), i64(O)), "float16"),
             y: T.Buffer((i64(M), i64(O)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                r = bx * threads + tx
                if r < M * O:
                    m = r // O
                    o = r % O
                    acc = T.decl_buffer((1,), "float64", scope="local")
                    grp = T.decl_buffer((1,), "float32", scope="local")
                    acc[0] = T.float64(0)
                    for g in range(G):
                        grp[0] = T.float32(0)
                        for k2 in range(group // 2):
                            byte = T.Cast("int32", wq[g * (group // 2) + k2, o])
                            grp[0] = (grp[0] + T.Cast("float32", x[m, g * group + 2 * k2])
                                      * T.Cast("float32", low_nibble(byte))
                                      + T.Cast("float32", x[m, g * group + 2 * k2 + 1])
                                      * T.Cast("float32", high_nibble(byte)))
                        acc[0] = acc[0] + T.Cast("float64", grp[0]) * T.Cast("float64", ws[g, o])
                    y[m, o] = T.Cast("float32", acc[0]) * sx[m, i64(0)]

    return w4a8.with_attr("tirx.is_scheduled", True)
