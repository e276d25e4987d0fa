"""Microbenchmarks of the kernels of schedules/, side by side in one run, on this CPU.

    python -m schedules.bench [--model d16|demo] [--repeat 7] [--out kernels.json]

For the transformer shapes of the model at its last scale (2 × n tokens under CFG):
- each dense layer (qkv, proj, fc1, fc2, head) in fp32, W8A8, W4A16 and W4A8 against our fp32
  kernel, PyTorch's fp32 Linear and PyTorch's dynamic int8 Linear (fbgemm);
- attention of the last scale against the whole KV cache: dense, MDWA bands of several widths
  (the cost should follow the kept pairs: time / dense ≤ 1.5 × kept fraction), ASC, and
  PyTorch's scaled_dot_product_attention on the dense problem; ÷ kept also from rounds of two
  calls per engine, paired with the same round's dense time (paired_ratios), a stricter figure;
- sampling one image's tokens (top-k 900, top-p 0.95): the compiled sampler against
  device/sampling.py (numpy) and the reference sampler (PyTorch);
- the 3×3 convolutions of the VQVAE decoder at their image sizes against PyTorch's conv2d.
Each row gives the median time, GFLOP/s (multiply-adds × 2, kept pairs only for attention) and
the fraction of this CPU's peak, measured first by a kernel of independent vector FMAs; int8
rows also the fraction of its integer peak, where W8A8 runs on vpmaddwd (x86 without VNNI) or
vpdpbusd (x86 with VNNI), measured by the same kind of kernel on that instruction.
Engines are timed in rounds (A, B, C, A, B, C, …), so load on this shared machine hits all alike,
each after a pause in which the last one's worker threads stop spinning (device.cores.settle)
and one untimed call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np
import torch
import tvm
from tvm.script import tirx as T

import targets
from compiler.compress.mdwa import kept_pairs
from compiler.compress.quant import W4A8, W4A16, W8A8
from compiler.errors import UserError, cli
from compiler.fileio import atomic_path
from compiler.lower.layers import padded_rows
from device.cores import claim_cores, settle
from compiler.sampler import sample_top_k_top_p
from device.sampling import make_rng, sample_tokens
from schedules import attention, conv, groupnorm, kv_layout, matmul, qmatmul, sampling, winograd

SHAPES = {  # width, heads, MLP hidden, vocabulary, patch_nums
    "d16": (1024, 16, 4096, 4096, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "demo": (128, 2, 512, 1024, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
}
CONVS = {  # decoder convolutions: in channels, out channels, image side, kernel size
    "d16": ((160, 160, 256, 3), (160, 160, 128, 3), (320, 320, 64, 3), (640, 640, 32, 3), (640, 640, 16, 3),
            (160, 3, 256, 3), (320, 160, 128, 1)),
    "demo": ((64, 64, 16, 3), (64, 64, 32, 3), (32, 32, 32, 3), (32, 3, 32, 3), (64, 32, 32, 1)),
}
INT8_ENGINES = ("tvm w8a8", "torch int8 (fbgemm)")   # measured against the integer peak too
WINDOWS = (64, 16, 4)      # band half-widths (in key tokens of the query's own scale) to measure
DENSE_SCALES = 3           # key scales 0–2 stay dense, as LiteVAR keeps them


def target():
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def compile_kernel(func):
    return tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=target())["f"]


def peak_kernel(threads: int, iters: int, chains: int = 12, lanes: int = 8):
    """Independent FMA chains in vector registers, one task per core: this CPU's fp32 peak."""
    @T.prim_func(private=True)
    def peak(out: T.Buffer((threads, lanes), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.decl_buffer((chains, lanes), "float32", scope="local")
            for a in T.unroll(chains):
                for u in T.vectorized(lanes):
                    acc[a, u] = T.Cast("float32", a + u + t)
            for _ in range(iters):
                for a in T.unroll(chains):
                    for u in T.vectorized(lanes):
                        acc[a, u] = acc[a, u] * T.float32(0.999) + T.float32(0.001)
            for u in T.vectorized(lanes):
                out[t, u] = T.float32(0)
            for a in range(chains):
                for u in T.vectorized(lanes):
                    out[t, u] = out[t, u] + acc[a, u]

    return peak.with_attr("tirx.is_scheduled", True), 2.0 * threads * iters * chains * lanes


PEAK_STEP = {"pmaddwd": "vpmaddwd + vpaddd", "vpdpbusd": "vpdpbusd"}   # x86 W8A8 inner steps


def int_peak_kernel(threads: int, iters: int, chains: int = 12, dot: str = "pmaddwd"):
    """The W8A8 kernel's inner step on x86, in independent chains: the integer peak it can reach.
    pmaddwd (no VNNI): vpmaddwd then vpaddd, 16 int16 multiply-adds into 8 int32 lanes;
    vpdpbusd (VNNI): 32 byte multiply-adds into 8 int32 lanes, accumulating."""
    vnni = dot == "vpdpbusd"
    intrin = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256" if vnni else "llvm.x86.avx2.pmadd.wd")

    @T.prim_func(private=True)
    def peak(out: T.Buffer((threads, 8), "int32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.decl_buffer((chains * 8,), "int32", scope="local")
            a = T.decl_buffer((16,), "int16", scope="local")
            for u in T.vectorized(16):
                a[u] = T.Cast("int16", u + t)
            for c in T.unroll(chains):
                for u in T.vectorized(8):
                    acc[c * 8 + u] = c + u
            for _ in range(iters):
                for c in T.unroll(chains):   # the chain's own value as one operand: nothing to hoist
                    if vnni:
                        acc[T.ramp(c * 8, 1, 8)] = T.call_llvm_pure_intrin(
                            intrin, acc[T.ramp(c * 8, 1, 8)], T.reinterpret(a[T.ramp(0, 1, 16)], dtype="int8x32"),
                            T.reinterpret(acc[T.ramp(c * 8, 1, 8)], dtype="int8x32"), dtype="int32x8")
                    else:
                        acc[T.ramp(c * 8, 1, 8)] = acc[T.ramp(c * 8, 1, 8)] + T.call_llvm_pure_intrin(
                            intrin, T.reinterpret(acc[T.ramp(c * 8, 1, 8)], dtype="int16x16"), a[T.ramp(0, 1, 16)],
                            dtype="int32x8")
            for u in T.vectorized(8):
                out[t, u] = 0
            for c in range(chains):
                for u in T.vectorized(8):
                    out[t, u] = out[t, u] + acc[c * 8 + u]

    return peak.with_attr("tirx.is_scheduled", True), 2.0 * threads * iters * chains * (32 if vnni else 16)


def best_rate(kernel, dtype: str, repeat: int = 5) -> float:
    """G operations per second of a peak kernel (peak_kernel, int_peak_kernel), best of `repeat`."""
    threads = tvm.get_global_func("runtime.NumThreads")()
    func, ops = kernel(threads, 2_000_000)
    f = compile_kernel(func)
    out = tvm.runtime.empty((threads, 8), dtype, tvm.cpu())
    return ops / min(timed(lambda: f(out), 1) for _ in range(repeat)) / 1e9


def measured_int_peak_gops(repeat: int = 5) -> float | None:
    """Integer multiply-adds × 2 per second at the W8A8 kernel's instruction, on x86 (PEAK_STEP)."""
    dot = targets.load("host").int_dot
    if dot not in PEAK_STEP:
        return None
    return best_rate(lambda threads, iters: int_peak_kernel(threads, iters, dot=dot), "int32", repeat)


def measured_peak_gflops(repeat: int = 5) -> float:
    return best_rate(peak_kernel, "float32", repeat)


def timed(call, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - t0) / number


def side_by_side(engines: dict, repeat: int, target_s: float = 0.05) -> dict:
    """name → median seconds per call; calls per sample chosen so a sample lasts ~target_s.
    Each sample starts on quiet cores (settle: the last engine's spinning threads slowed the
    next one by up to 1.4×) after one untimed call that wakes the engine's own threads
    (PyTorch's first call after a pause took up to 3× its time)."""
    number = {}
    for name, call in engines.items():
        call()                                             # warm up (and first-touch the memory)
        number[name] = max(1, int(target_s / max(timed(call, 1), 1e-6)))
    samples = {name: [] for name in engines}
    for _ in range(repeat):
        for name, call in engines.items():
            settle()
            call()
            samples[name].append(timed(call, number[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratios(engines: dict, base: str, rounds: int, calls: int = 2) -> dict:
    """name → median over rounds of (its time ÷ `base`'s time in the same round), each engine
    timed for only `calls` calls a round: less of its data is still in the caches than in
    side_by_side's back-to-back samples of ~50 ms, and each ratio pairs two timings taken
    moments apart on this shared machine. Meant for engines of one runtime (our kernels): a
    round times each without a warm-up call, since its point is the caches the others left."""
    for call in engines.values():
        call()
    ratios = {name: [] for name in engines}
    for _ in range(rounds):
        t = {}
        for name, call in engines.items():
            settle()
            t[name] = timed(call, calls)
        for name in engines:
            ratios[name].append(t[name] / t[base])
    return {name: statistics.median(r) for name, r in ratios.items()}


def tensors(*arrays):
    return [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in arrays]


def dense_engines(M: int, K: int, O: int, group: int = 64) -> dict:
    rng = np.random.default_rng(K + O)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((O, K)) / np.sqrt(K)).astype(np.float32)
    b = np.zeros(O, np.float32)
    Mp = padded_rows(M)    # what a compiled Dense layer runs: rows padded to its best tile, in every scheme
    y = tvm.runtime.empty((Mp, O), "float32", tvm.cpu())
    xq_t = tvm.runtime.empty((Mp, K), "int8", tvm.cpu())
    sx_t = tvm.runtime.empty((Mp, 1), "float32", tvm.cpu())
    quant = compile_kernel(matmul.quantize_per_token(Mp, K))
    engines = {}
    fp32 = compile_kernel(matmul.dense_fp32(Mp, K, O))
    x_t, none = tensors(np.pad(x, ((0, Mp - M), (0, 0))), np.zeros((1, 1), np.float32))
    args = tensors(matmul.pack_weight(w), b)
    engines["tvm fp32"] = lambda: fp32(x_t, *args, y)
    for scheme in (W8A8(), W4A16(group), W4A8(group)):
        packed = {k: v.numpy() for k, v in scheme.pack(torch.from_numpy(w)).items()}
        dot = qmatmul.cpu_dot(targets.load("host").int_dot, scheme.name, K, scheme.group)  # as compiler.build here
        wp, ws = qmatmul.pack_cpu(scheme.name, packed["qweight"], packed["scales"], dot)
        kernel = compile_kernel(qmatmul.cpu_kernel(Mp, K, O, scheme.name, scheme.group, dot))
        wargs = tensors(wp, ws, b)
        if scheme.name == "w4a16":
            engines[f"tvm {scheme.name}"] = lambda k=kernel, a=wargs: k(x_t, none, *a, y)
        else:   # the per-token quantization of the activations is part of the layer's cost
            engines[f"tvm {scheme.name}"] = lambda k=kernel, a=wargs: (quant(x_t, xq_t, sx_t), k(xq_t, sx_t, *a, y))
    lin = torch.nn.Linear(K, O).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    xt = torch.from_numpy(x)
    with warnings.catch_warnings():   # torch.ao's eager quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)

    def torch_fp32():
        with torch.no_grad():
            lin(xt)

    def torch_int8():
        with torch.no_grad():
            qlin(xt)
    engines["torch fp32"] = torch_fp32
    engines["torch int8 (fbgemm)"] = torch_int8
    return engines


def attention_case(width: int, heads: int, pns, window: int | None, share: str | None = None):
    """Windows for the last query scale: key scales < DENSE_SCALES dense, the rest `window`."""
    S, qs = len(pns), len(pns) - 1
    win = -np.ones((S, heads, S), np.int32)
    if window is not None:
        win[qs, :, DENSE_SCALES:] = window
    windows_q = [None if w < 0 else int(w) for w in win[qs, 0, :]]
    n = pns[qs] ** 2
    kept = kept_pairs(windows_q, pns, qs)
    return win, kept / (n * sum(p * p for p in pns)), kept


def attention_engines(width: int, heads: int, pns) -> tuple[dict, dict]:
    """name → call, and name → kept fraction of (query, key) pairs."""
    NB, H, c = 2, heads, width // heads
    S, qs = len(pns), len(pns) - 1
    n, T_, L = pns[qs] ** 2, sum(p * p for p in pns), kv_layout.cache_len(pns)
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((NB, H, n, c)) / np.sqrt(np.sqrt(c))).astype(np.float32)
    kv = (rng.standard_normal((2, NB, H, T_, c)) / np.sqrt(np.sqrt(c))).astype(np.float32)
    out = tvm.runtime.empty((NB, H, n, c), "float32", tvm.cpu())
    out_half = tvm.runtime.empty((NB // 2, H, n, c), "float32", tvm.cpu())
    q_t, q_half_t, kv_t, geom_t = tensors(q, q[:NB // 2], kv_layout.cache_of(kv, pns), kv_layout.scale_slots(pns))
    engines, kept = {}, {}
    cases = [("dense", None, None, None)] + [(f"MDWA w={w}", w, None, None) for w in WINDOWS]
    cases += [(f"MDWA w={WINDOWS[1]} + ASC {s}", WINDOWS[1], s, None) for s in ("map", "output", "cond")]
    # a plan's 8-bit attention (weights rounded per row, two walks): what it costs, dense and windowed
    cases += [("8-bit attention, dense", None, None, 8), (f"8-bit attention, MDWA w={WINDOWS[1]}", WINDOWS[1], None, 8)]
    for name, window, share, bits in cases:
        win, frac, _ = attention_case(width, heads, pns, window)
        f = compile_kernel(attention.windowed_attention(NB, H, n, c, L, S, qs, share, map_bits=bits))
        (win_t,) = tensors(win)
        qa, oa = (q_half_t, out_half) if share == "cond" else (q_t, out)
        engines[name] = lambda f=f, w=win_t, qa=qa, oa=oa: f(qa, kv_t, w, geom_t, oa)
        # ASC: one CFG half computes the scores and weights; "map" still applies them to both
        # halves' values (half the work is q·k, half p·v), "output" copies the result, "cond"
        # (what builds run where the other half is never used again) computes one half only
        kept[name] = frac * {None: 1.0, "map": 0.75, "output": 0.5, "cond": 0.5}[share]
    qt, kt, vt = (torch.from_numpy(a) for a in (q, kv[0], kv[1]))
    engines["torch SDPA (dense)"] = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    kept["torch SDPA (dense)"] = 1.0
    return engines, kept


def conv_engines(Ci: int, Co: int, side: int, k: int = 3) -> dict:
    rng = np.random.default_rng(Ci + side)
    x = rng.standard_normal((1, Ci, side, side)).astype(np.float32)
    w = (rng.standard_normal((Co, Ci, k, k)) / np.sqrt(Ci * k * k)).astype(np.float32)
    b = np.zeros(Co, np.float32)
    f = compile_kernel(conv.conv2d(1, Ci, side, side, Co, k))
    args = tensors(x, conv.pack_weight(w), b) + [tvm.runtime.empty((1, Co, side, side), "float32", tvm.cpu())]
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))

    def torch_conv():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, bt, padding=k // 2)
    engines = {"tvm conv": lambda: f(*args), "torch conv2d": torch_conv}
    if winograd.applies(Co, k, 1, k // 2, side, side):
        fw = compile_kernel(winograd.conv2d(1, Ci, side, side, Co))
        wargs = tensors(x, conv.pack_weight(w), b) + [tvm.runtime.empty((1, Co, side, side), "float32", tvm.cpu())]
        engines["tvm winograd"] = lambda: fw(*wargs)
    if k == 3 and groupnorm.applies(side, side) and Ci % 32 == 0 and Co % 32 == 0:   # the GroupNorm + SiLU before it
        g = compile_kernel(groupnorm.group_norm(1, Ci, side, side, 32, 1e-6, True))
        gargs = tensors(x, np.ones(Ci, np.float32), b[:1].repeat(Ci)) + [tvm.runtime.empty(x.shape, "float32", tvm.cpu())]
        ones, zeros = torch.ones(Ci), torch.zeros(Ci)

        def torch_norm():
            with torch.no_grad():
                torch.nn.functional.silu(torch.nn.functional.group_norm(xt, 32, ones, zeros, 1e-6))
        engines.update({"tvm groupnorm+silu": lambda: g(*gargs), "torch groupnorm+silu": torch_norm})
    return engines


def sampling_engines(rows: int, vocab: int, top_k: int = 900, top_p: float = 0.95) -> dict:
    """One image's tokens in one call: the compiled sampler, device/sampling.py (numpy) and the
    reference sampler (PyTorch), at top-k 900 / top-p 0.95 as in the benchmarks."""
    logits = (np.random.default_rng(vocab).standard_normal((rows, vocab)) * 3).astype(np.float32)
    f = compile_kernel(sampling.sample_rows(rows, vocab))
    args = tensors(logits, np.random.default_rng(0).random(rows).astype(np.float32),
                   np.array([top_k, top_p], np.float32)) + [tvm.runtime.empty((rows,), "int32", tvm.cpu())]
    rng, gen, lt = make_rng(0), torch.Generator().manual_seed(0), torch.from_numpy(logits)[None]
    return {"tvm sample_rows": lambda: f(*args),
            "numpy (device/sampling.py)": lambda: sample_tokens(logits, top_k, top_p, rng),
            "torch (reference sampler)": lambda: sample_top_k_top_p(lt, top_k, top_p, gen)}


def run(model: str, repeat: int, log=print) -> dict:
    width, heads, hidden, vocab, pns = SHAPES[model]
    M = 2 * pns[-1] ** 2
    claim_cores()
    threads = tvm.get_global_func("runtime.NumThreads")()
    torch.set_num_threads(threads)
    log(f"measuring this CPU's fp32 peak ({threads} threads of vector FMAs) …")
    peak = measured_peak_gflops()
    log(f"  {peak:.0f} GFLOP/s")
    int_peak = measured_int_peak_gops()
    if int_peak is not None:
        log(f"  and its integer dot-product peak ({PEAK_STEP[targets.load('host').int_dot]}): {int_peak:.0f} GOP/s")
    report = {"model": model, "tokens": M, "peak_gflops": peak, "int_peak_gops": int_peak,
              "dense": [], "attention": [], "conv": [], "groupnorm": [], "sampling": []}
    layers = {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, hidden),
              "fc2": (hidden, width), "head": (width, vocab)}
    for layer, (K, O) in layers.items():
        log(f"{layer}: {M}×{K} · {K}×{O}, compiling …")
        times = side_by_side(dense_engines(M, K, O), repeat)
        flops = 2.0 * M * K * O
        for name, t in times.items():
            report["dense"].append({"layer": layer, "M": M, "K": K, "O": O, "engine": name, "ms": t * 1e3,
                                    "gflops": flops / t / 1e9, "of_peak": flops / t / 1e9 / peak,
                                    "of_int_peak": (flops / t / 1e9 / int_peak
                                                    if int_peak and name in INT8_ENGINES else None),
                                    "vs_tvm_fp32": times["tvm fp32"] / t, "vs_torch_fp32": times["torch fp32"] / t})
    n, L, c = pns[-1] ** 2, sum(p * p for p in pns), width // heads
    log(f"attention: 2×{heads} heads × {n} queries × {L} keys (c={c}), compiling …")
    engines, kept = attention_engines(width, heads, pns)
    times = side_by_side(engines, repeat)
    paired = paired_ratios({k: f for k, f in engines.items() if not k.startswith("torch")}, "dense", 3 * repeat)
    for name, t in times.items():
        flops = 2 * 2.0 * 2 * heads * n * L * c * kept[name]     # q·k and p·v over the kept pairs
        rel = t / times["dense"]
        report["attention"].append({"engine": name, "ms": t * 1e3, "kept_fraction": kept[name],
                                    "time_vs_dense": rel, "cost_per_kept": rel / kept[name],
                                    "cost_per_kept_paired": paired[name] / kept[name] if name in paired else None,
                                    "gflops": flops / t / 1e9, "of_peak": flops / t / 1e9 / peak})
    L = sum(p * p for p in pns)
    log(f"sampling: {L} tokens × {vocab} codes, compiling …")
    times = side_by_side(sampling_engines(L, vocab), repeat)
    for name, t in times.items():
        report["sampling"].append({"tokens": L, "vocab": vocab, "engine": name, "ms": t * 1e3,
                                   "vs_numpy": times["numpy (device/sampling.py)"] / t,
                                   "vs_torch": times["torch (reference sampler)"] / t})
    for Ci, Co, side, k in CONVS[model]:
        log(f"conv {k}×{k} {Ci}→{Co} at {side}×{side}, compiling …")
        times = side_by_side(conv_engines(Ci, Co, side, k), repeat)
        flops = 2.0 * Ci * Co * k * k * side * side
        for name, t in times.items():
            if "groupnorm" in name:
                base = times["torch groupnorm+silu"]
                report["groupnorm"].append({"C": Ci, "side": side, "engine": name, "ms": t * 1e3, "vs_torch": base / t})
                continue
            report["conv"].append({"Ci": Ci, "Co": Co, "side": side, "k": k, "engine": name, "ms": t * 1e3,
                                   "gflops": flops / t / 1e9, "of_peak": flops / t / 1e9 / peak,
                                   "vs_torch": times["torch conv2d"] / t})
    return report


def print_report(r: dict, log=print):
    int_peak = r.get("int_peak_gops")
    log(f"\nDense layers, {r['tokens']} tokens ({r['model']}); peak {r['peak_gflops']:.0f} GFLOP/s"
        + (f", integer dot peak {int_peak:.0f} GOP/s (of int peak: int8 engines)" if int_peak else ""))
    log(f"{'layer':6} {'engine':22} {'ms':>8} {'GFLOP/s':>8} {'of peak':>8} {'of int peak':>12} {'vs tvm fp32':>12} "
        f"{'vs torch fp32':>14}")
    for d in r["dense"]:
        of_int = f"{d['of_int_peak']:12.1%}" if d.get("of_int_peak") is not None else f"{'':12}"
        log(f"{d['layer']:6} {d['engine']:22} {d['ms']:8.2f} {d['gflops']:8.1f} {d['of_peak']:8.1%} {of_int} "
            f"{d['vs_tvm_fp32']:11.2f}× {d['vs_torch_fp32']:13.2f}×")
    log("\nAttention of the last scale (time / dense should be ≤ 1.5 × kept fraction; the last column:"
        "\nthe median, over rounds of 2 calls of each engine, of time ÷ that round's dense time ÷ kept)")
    log(f"{'engine':26} {'ms':>8} {'kept':>7} {'time/dense':>11} {'÷ kept':>7} {'GFLOP/s':>8} {'of peak':>8} "
        f"{'÷ kept, 2 calls':>16}")
    for a in r["attention"]:
        log(f"{a['engine']:26} {a['ms']:8.2f} {a['kept_fraction']:7.1%} {a['time_vs_dense']:11.3f} "
            f"{a['cost_per_kept']:7.2f} {a['gflops']:8.1f} {a['of_peak']:8.1%} "
            + (f"{a['cost_per_kept_paired']:16.2f}" if a["cost_per_kept_paired"] is not None else f"{'—':>16}"))
    if r.get("sampling"):
        log(f"\nSampling one image's {r['sampling'][0]['tokens']} tokens over {r['sampling'][0]['vocab']} codes "
            "(top-k 900, top-p 0.95)")
        for a in r["sampling"]:
            log(f"{a['engine']:28} {a['ms']:8.2f} ms {a['vs_numpy']:8.2f}× numpy {a['vs_torch']:8.2f}× torch")
    log("\nDecoder convolutions (batch 1)")
    log(f"{'shape':22} {'engine':14} {'ms':>8} {'GFLOP/s':>8} {'of peak':>8} {'vs torch':>9}")
    for c in r["conv"]:
        shape = f"{c['k']}×{c['k']} {c['Ci']}→{c['Co']} @ {c['side']}²"
        log(f"{shape:22} {c['engine']:14} {c['ms']:8.2f} {c['gflops']:8.1f} {c['of_peak']:8.1%} {c['vs_torch']:8.2f}×")
    log("\nGroupNorm (32 groups) + SiLU before those convolutions")
    for g in r["groupnorm"]:
        log(f"{g['C']:4} ch @ {g['side']}²  {g['engine']:22} {g['ms']:8.2f} ms {g['vs_torch']:8.2f}×")


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m schedules.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="d16", help="layer shapes (default d16)")
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds per engine (default 7)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        raise UserError(f"--repeat must be at least 1, got {args.repeat}")
    report = run(args.model, args.repeat)
    print_report(report)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
