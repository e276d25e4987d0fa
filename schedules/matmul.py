"""Dense layers y = x·Wᵀ + b in fp32 as scheduled TIR kernels for CPUs (LLVM), and the per-token
int8 quantization of activations (quantized kernels: schedules/qmatmul.py).

(GPU builds express dense layers as Relax matmuls, which DLight's matmul/GEMV rules schedule,
except that CUDA runs fp32 layers of few rows on dense_rows_gpu, at the end of this file; they
also use the per-token quantization, bound to GPU threads.)

Weights are stored pre-packed in panels of `LANES` output channels, wp[O/LANES, K, LANES], so the
inner loop streams one contiguous panel while a tile of `mi` rows × LANES outputs stays in
vector registers (6×16 fp32 = 12 AVX2 registers). Panels run outermost and are split between
threads, each panel reused for every row tile while it is in cache. Untuned TVM matmuls are
about 10× slower; this schedule is within reach of PyTorch's oneDNN on the d16 shapes.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from tvm import s_tir, tirx
from tvm.script import tirx as T

LANES = 16          # output channels per panel: two AVX2 / four NEON registers
K_UNROLL = 4
ROW_TILES = (6, 4, 5, 3, 2)   # 6×16 outputs: 12 AVX2 accumulators hide the FMA latency that 8 do not
                              # (fp32 1.1–1.4× faster than 4×16 on the d16 shapes at 512 rows), and
                              # the integer kernels load a weight vector for 6 rows instead of 4
                              # (W8A8 1.0–1.2×, W4A8 1.0–1.05×, W4A16 1.1× at 512 rows)


def row_tile(M: int) -> int:
    """Rows per register tile: the first of ROW_TILES dividing M (a ragged tile would add
    predicates to the innermost loop)."""
    return next((m for m in ROW_TILES if M % m == 0), 1)


def pack_weight(w: np.ndarray, gpu: bool = False) -> np.ndarray:
    """O×K (the checkpoint's layout) → panels O/LANES × K × LANES; for GPUs K×O, the layout of
    a plain matmul, so that no transpose runs before it."""
    O, K = w.shape
    if gpu:
        return np.ascontiguousarray(w.T)
    if O % LANES:
        raise ValueError(f"{O} output channels are not a multiple of {LANES}")
    return np.ascontiguousarray(w.reshape(O // LANES, LANES, K).transpose(0, 2, 1))


def _schedule(func, M: int, epilogue: str):
    """Register-tiled, vectorised, panel-parallel schedule of block "mm" plus its epilogue."""
    sch = s_tir.Schedule(func)
    mm = sch.get_sblock("mm")
    i, j, k = sch.get_loops(mm)
    io, ii = sch.split(i, [None, row_tile(M)])
    jo, ji = sch.split(j, [None, LANES])
    ko, ki = sch.split(k, [None, K_UNROLL])
    sch.reorder(jo, io, ko, ki, ii, ji)
    out = sch.get_sblock(epilogue)
    sch.reverse_compute_at(out, io)
    sch.vectorize(ji)
    sch.unroll(ki)
    sch.unroll(ii)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.parallel(sch.fuse(jo, io))
    sch.decompose_reduction(mm, ko)
    # op_pattern 8 (opaque): FuseOps must not merge it into a neighbour and lose the schedule
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def bind_threads(sch, loop, threads: int = 128):
    """Spread one loop over GPU thread blocks of `threads` threads."""
    bx, tx = sch.split(loop, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def fast_tanh(x):
    """tanh in float32 lanes: a rational function of degree 13/6 on x clamped to ±9 (the
    approximation TVM's fast_tanh and Eigen use; within 4e-7 of tanh)."""
    x = tirx.min(tirx.max(x, tirx.const(-9.0, "float32")), tirx.const(9.0, "float32"))
    x2 = x * x
    p = tirx.const(-2.76076847742355e-16, "float32")
    for coef in (2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08, 1.48572235717979e-05,
                 6.37261928875436e-04, 4.89352455891786e-03):
        p = p * x2 + tirx.const(coef, "float32")
    q = tirx.const(1.19825839466702e-06, "float32")
    for coef in (1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03):
        q = q * x2 + tirx.const(coef, "float32")
    return x * p / q


def gelu_tanh_lanes(x):
    """GELU, tanh form (as the reference's F.gelu(approximate="tanh")), on fast_tanh: a TIR
    expression for the fp32 kernel's epilogue (compiler/lower/layers.py: gelu_tanh is the Relax
    graph's)."""
    inner = (x * x * x * tirx.const(0.044715, "float32") + x) * tirx.const(math.sqrt(2 / math.pi), "float32")
    return x * tirx.const(0.5, "float32") * (fast_tanh(inner) + tirx.const(1.0, "float32"))


@lru_cache(maxsize=None)  # one parse and schedule per shape
def dense_fp32(M: int, K: int, O: int, gelu: bool = False, wdtype: str = "float32"):
    """x M×K, wp (packed), b O → y M×O (float32); with `gelu`, GELU(x·Wᵀ + b) (ffn.fc1), computed
    on the tile while it is in cache instead of in a pass of its own over M×O. wdtype "float16":
    the panels hold float16 weights (plan scheme fp16), widened next to the multiply (x86
    vcvtph2ps, AArch64 fcvtl); the arithmetic stays float32."""
    P, L = O // LANES, LANES
    act = gelu_tanh_lanes if gelu else (lambda v: v)
    widen = (lambda v: T.Cast("float32", v)) if wdtype == "float16" else (lambda v: v)

    @T.prim_func(private=True, s_tir=True)
    def dense(x: T.Buffer((T.int64(M), T.int64(K)), "float32"),
              wp: T.Buffer((T.int64(P), T.int64(K), T.int64(L)), wdtype),
              b: T.Buffer((T.int64(O),), "float32"),
              y: T.Buffer((T.int64(M), T.int64(O)), "float32")):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((T.int64(M), T.int64(O)), "float32")
        for i, j, k in T.grid(T.int64(M), T.int64(O), T.int64(K)):
            with T.sblock("mm"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    acc[vi, vj] = T.float32(0)
                acc[vi, vj] = acc[vi, vj] + x[vi, vk] * widen(wp[vj // L, vk, vj % L])
        for i, j in T.grid(T.int64(M), T.int64(O)):
            with T.sblock("bias"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = act(acc[vi, vj] + b[vj])

    return _schedule(dense, M, "bias")


@lru_cache(maxsize=None)  # one parse and schedule per shape
def quantize_per_token(M: int, K: int):
    """x M×K float32 → (int8 M×K, scales M×1): s = max|x|/127 (≥ 1e-12), q = nearbyint(x/s)
    clamped to ±127 — round half to even, as torch.round. On CPUs; GPUs: quantize_per_token_gpu."""

    @T.prim_func(private=True, s_tir=True)
    def quant(x: T.Buffer((T.int64(M), T.int64(K)), "float32"),
              q: T.Buffer((T.int64(M), T.int64(K)), "int8"),
              s: T.Buffer((T.int64(M), T.int64(1)), "float32")):
        T.func_attr({"tirx.noalias": True})
        amax = T.alloc_buffer((T.int64(M),), "float32")
        for i, k in T.grid(T.int64(M), T.int64(K)):
            with T.sblock("amax"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    amax[vi] = T.float32(0)
                amax[vi] = T.max(amax[vi], T.fabs(x[vi, vk]))
        for i in T.serial(T.int64(M)):
            with T.sblock("scale"):
                vi = T.axis.remap("S", [i])
                s[vi, T.int64(0)] = T.max(amax[vi] / T.float32(127), T.float32(1e-12))
        for i, k in T.grid(T.int64(M), T.int64(K)):
            with T.sblock("round"):
                vi, vk = T.axis.remap("SS", [i, k])
                q[vi, vk] = T.Cast("int8", T.max(T.min(T.nearbyint(x[vi, vk] / s[vi, T.int64(0)]),
                                                       T.float32(127)), T.float32(-127)))

    sch = s_tir.Schedule(quant)
    for name in ("amax", "round"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


@lru_cache(maxsize=None)
def quantize_per_token_gpu(M: int, K: int, bound: bool = True, TX: int | None = None):
    """quantize_per_token on a GPU, in one kernel: a block of TX threads per row. Each thread takes
    the maximum of every TX-th input (consecutive threads, consecutive inputs), the block's
    maxima meet in a tree in shared memory, and the same threads round the row. The first GPU
    schedule of quantize_per_token gave each row one thread for its maximum and took three
    kernels: at VAR's first scales two threads scanned 1024–4096 inputs one after another, for
    each of a block's three W8A8 layers. TX: a power of two (the tree), by default the smallest
    that covers K, at most 256 (8-bit attention quantizes rows of 64). bound=False: loops serial,
    for tests on a CPU."""
    TX = TX or min(256, 1 << (K - 1).bit_length())
    assert TX & (TX - 1) == 0, "TX must be a power of two (the tree)"
    i64 = T.int64
    grid_x, _, thr_x, _, NT, slot, shared = gpu_loops(bound, TX)
    steps = (K + TX - 1) // TX
    levels = TX.bit_length() - 1                # the tree's: halves of TX/2, TX/4, …, 1 threads

    @T.macro
    def barrier():
        if bound:
            T.tvm_storage_sync("shared")

    @T.macro
    def fold(red, half):
        for t in thr_x(TX):
            if t < half:
                red[t] = T.max(red[t], red[t + half])
        barrier()

    @T.prim_func(private=True, s_tir=True)
    def quant(x: T.Buffer((i64(M), i64(K)), "float32"), q: T.Buffer((i64(M), i64(K)), "int8"),
              s: T.Buffer((i64(M), i64(1)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        with T.sblock("root"):        # Relax's analysis of one-input kernels expects a root block
            for i in grid_x(M):
                red = T.decl_buffer((TX,), "float32", scope=shared)
                m = T.decl_buffer((NT,), "float32", scope="local")
                for t in thr_x(TX):
                    m[slot(t)] = T.float32(0)
                    for j in range(steps):
                        if K % TX == 0 or j * TX + t < K:
                            m[slot(t)] = T.max(m[slot(t)], T.fabs(x[i, j * TX + t]))
                    red[t] = m[slot(t)]
                barrier()
                for lv in T.unroll(levels):
                    fold(red, T.shift_right(TX, lv + 1))
                for t in thr_x(TX):
                    if t == 0:
                        s[i, 0] = T.max(red[0] / T.float32(127), T.float32(1e-12))
                    for j in range(steps):
                        if K % TX == 0 or j * TX + t < K:
                            q[i, j * TX + t] = T.Cast("int8", T.max(T.min(T.nearbyint(
                                x[i, j * TX + t] / T.max(red[0] / T.float32(127), T.float32(1e-12))),
                                T.float32(127)), T.float32(-127)))

    return quant.with_attr("tirx.is_scheduled", True)


@lru_cache(maxsize=None)
def add_bias_gpu(M: int, O: int):
    """y + b in a kernel of its own (opaque to FuseOps), after the W8A8 matmul DLight schedules
    (OpenCL): fused into its epilogue, the add would be contracted with the last scale multiply
    into one FMA and differ from the simulation's y·s_w + b in the last bit, which flips int8
    roundings downstream. CUDA's dp4a kernels are opaque themselves, so their add fuses onward."""

    @T.prim_func(private=True, s_tir=True)
    def add_bias(y: T.Buffer((T.int64(M), T.int64(O)), "float32"), b: T.Buffer((T.int64(O),), "float32"),
                 out: T.Buffer((T.int64(M), T.int64(O)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, j in T.grid(T.int64(M), T.int64(O)):
            with T.sblock("add"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = y[vi, vj] + b[vj]

    sch = s_tir.Schedule(add_bias)
    bind_threads(sch, sch.fuse(*sch.get_loops(sch.get_sblock("add"))))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


ROWS_GPU = 512     # CUDA fp32 dense layers of up to this many rows run dense_rows_gpu (a scale's
                   # tokens × 2 for CFG: all of VAR's scales at batch 1); on an H200 it beat DLight's
                   # matmul at every row count measured, 2 to 512 (README, H100 and H200)


def gelu_tanh_exact(x):
    """GELU, tanh form, with the target's tanh: what the GPU graph computes (layers.gelu_tanh)."""
    inner = (x * x * x * tirx.const(0.044715, "float32") + x) * tirx.const(math.sqrt(2 / math.pi), "float32")
    return x * tirx.const(0.5, "float32") * (tirx.tanh(inner) + tirx.const(1.0, "float32"))


def gpu_loops(bound: bool, threads: int):
    """The block and thread loops of a hand-written GPU kernel, and where its per-thread and shared
    buffers live: bound to CUDA's indices, or (bound=False) serial loops that run on a CPU, each
    thread's registers in a slot of their own and shared memory in global memory. Returns
    (block_x, block_y, thread_x, thread_y, slots, slot, shared)."""
    if bound:
        bind = lambda axis: lambda e: T.thread_binding(e, thread=axis)  # noqa: E731
        return (bind("blockIdx.x"), bind("blockIdx.y"), bind("threadIdx.x"), bind("threadIdx.y"), 1,
                lambda t: 0, "shared")
    return T.serial, T.serial, T.serial, T.serial, threads, lambda t: t, "global"


def few_rows_body(M: int, R: int, O: int, dtype: str, bound: bool, TX: int, TY: int, MT: int):
    """The body the GPU kernels for few rows share (dense_rows_gpu, qmatmul.dense_w8a8_dp4a_rows),
    as a macro: body(y, w_at, mac, start, finish) with R reduction steps (inputs, or int32 words
    of 4 inputs), w_at(step, column) the weight, mac(acc, row, step, w) one multiply-add, start(column)
    the sum's first value and finish(sum, row, column) the output.

    K is split between the TY thread rows of a block: each thread sums every TY-th step for up to
    MT rows × 4 columns (one 16-byte load of W per step, a warp reading whole rows of W), the
    partial sums meet in shared memory, and each thread adds up TY of them for its outputs. A
    block covers MT rows × 4·TX columns."""
    VC = 4 if O % 4 == 0 else 1                 # columns per thread: one 16-byte load of W
    CT, MT = TX * VC, min(MT, M)                # columns and rows per block
    threads = TX * TY
    outs = (MT * CT + threads - 1) // threads   # outputs each thread sums in the second phase
    steps = (R + TY - 1) // TY                  # reduction steps per thread
    grid_x, grid_y, thr_x, thr_y, NT, slot, shared = gpu_loops(bound, threads)
    col = (lambda bx, tx, c: bx * CT + tx * VC + c) if O % CT == 0 else (  # noqa: E731
        lambda bx, tx, c: T.min(bx * CT + tx * VC + c, O - 1))           # clamped reads past O

    @T.macro
    def barrier():
        if bound:
            T.tvm_storage_sync("shared")

    @T.macro
    def body(y, w_at, mac, start, finish):
        for by in grid_y((M + MT - 1) // MT):
            for bx in grid_x((O + CT - 1) // CT):
                part = T.decl_buffer((TY * MT * CT,), dtype, scope=shared)   # [thread row][row][column]
                acc = T.decl_buffer((NT, MT * VC), dtype, scope="local")
                wv = T.decl_buffer((NT, VC), dtype, scope="local")
                for ty in thr_y(TY):
                    for tx in thr_x(TX):
                        t = T.meta_var(ty * TX + tx)
                        for a in T.unroll(MT * VC):
                            acc[slot(t), a] = T.Cast(dtype, 0)
                        for s in range(steps):
                            if R % TY == 0 or s * TY + ty < R:
                                for c in T.vectorized(VC):
                                    wv[slot(t), c] = w_at(s * TY + ty, col(bx, tx, c))
                                for r in T.unroll(MT):
                                    for c in T.unroll(VC):
                                        acc[slot(t), r * VC + c] = mac(acc[slot(t), r * VC + c],
                                                                       T.min(by * MT + r, M - 1), s * TY + ty, wv[slot(t), c])
                        for r in T.unroll(MT):
                            for c in T.unroll(VC):
                                part[(ty * MT + r) * CT + tx * VC + c] = acc[slot(t), r * VC + c]
                barrier()
                for ty in thr_y(TY):
                    for tx in thr_x(TX):
                        for e in T.unroll(outs):
                            o = e * threads + ty * TX + tx    # consecutive threads, consecutive columns
                            if o < MT * CT and by * MT + o // CT < M and bx * CT + o % CT < O:
                                tot = T.decl_buffer((1,), dtype, scope="local")
                                tot[0] = start(bx * CT + o % CT)
                                for p in range(TY):
                                    tot[0] = tot[0] + part[(p * MT + o // CT) * CT + o % CT]
                                y[by * MT + o // CT, bx * CT + o % CT] = finish(
                                    tot[0], by * MT + o // CT, bx * CT + o % CT)

    return body


@lru_cache(maxsize=None)
def dense_rows_gpu(M: int, K: int, O: int, gelu: bool = False, bound: bool = True,
                   TX: int = 8, TY: int = 32, MT: int = 8, wdtype: str = "float32"):
    """y = x·W + b (then GELU with `gelu`) for few rows on a GPU: x M×K, W K×O (the GPU layout of
    pack_weight), b O → y M×O, float32. wdtype "float16": W holds float16 weights (plan scheme
    fp16), widened as they are loaded (4 columns in one 8-byte load); the sums stay float32.

    DLight's matmul rule tiles M by 32 and walks K in one thread block per 64 columns, so at 2
    rows (VAR's first scale under CFG) a layer ran as 2–16 blocks that each read all of K in
    sequence. Here K is split between threads (few_rows_body), and the bias and GELU are added to
    the summed partials. bound=False leaves the block and thread loops serial (each thread's sums
    in a slot of its own), so tests run the same arithmetic on a CPU."""
    i64 = T.int64
    body = few_rows_body(M, K, O, "float32", bound, TX, TY, MT)

    @T.prim_func(private=True)
    def dense(x: T.Buffer((i64(M), i64(K)), "float32"), w: T.Buffer((i64(K), i64(O)), wdtype),
              b: T.Buffer((i64(O),), "float32"), y: T.Buffer((i64(M), i64(O)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        body(y, lambda k, j: T.Cast("float32", w[k, j]), lambda acc, i, k, wk: acc + x[i, k] * wk, lambda j: b[j],
             lambda tot, i, j: gelu_tanh_exact(tot) if gelu else tot)

    return dense.with_attr("tirx.is_scheduled", True)
