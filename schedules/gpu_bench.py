"""Kernels on a GPU, side by side. CUDA: W8A8 matmuls (our dp4a kernel, DLight's int8 matmul, an
fp32 matmul), dense layers of few rows (our fp32 kernel for them, with float32 or float16
weights, and our W8A8 one against DLight's matmul and the tiled dp4a kernel), and attention at d16's last scale (the tiled kernel in
several tilings, the one-thread-per-row kernel in fp32 and with 8-bit softmax weights).
OpenCL (Mali): the attention kernel with 16-byte loads against the same kernel one float at a time.

    python -m schedules.gpu_bench build --target h100 --out DIR   # here: one library per kernel and shape
    python -m schedules.gpu_bench run DIR                         # on the GPU machine (TVM runtime + numpy)

An OpenCL target (`--target mali-g610`) writes the kernels' OpenCL C instead of libraries, and
`run` launches them through pyopencl on the first OpenCL device it finds (libmali on the board,
PoCL on a PC), so the board needs neither TVM nor an OpenCL build of its runtime.

Matmuls: d16's shapes at the last scales (qkv, proj, fc2), activations already quantized; `run`
checks each int8 kernel against the exact integer product (numpy int64) scaled as the
simulation does. Attention: 2 × 16 heads × 256 queries × 680 keys × 64, dense, MDWA bands
(schedules/bench.py's cases) and ASC; `run` checks the dense output against numpy and every
other output against the per-row kernel's (tested against the reference in tests/; for the 8-bit
kernel the difference is its rounding, checked against the simulation in tests/), and, where
PyTorch is installed, times its SDPA on the dense problem. Inputs come from seeds on both sides,
so DIR holds only the libraries and the window tables.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from device.errors import UserError, cli
from schedules import kv_layout         # numpy only, like packing: `run` has just the TVM runtime
from schedules.packing import pack_dp4a

SHAPES = ((512, 1024, 3072), (338, 1024, 1024), (512, 4096, 1024))
KINDS = ("dp4a", "dlight_int8", "dlight_fp32")
FEW_ROWS = (2, 8, 18, 32, 72, 128, 200, 338, 512)   # fp32 dense layers at VAR's scales (tokens × 2)
FEW_ROWS_LAYERS = ((1024, 3072), (4096, 1024))   # d16's qkv and fc2: K, O
FEW_ROWS_KINDS = ("rows", "rows_fp16", "dlight")  # matmul.dense_rows_gpu (float32 or float16 weights, the
                                                   # plan's fp16 fc2), or a Relax matmul + bias for DLight
FEW_ROWS_W8A8 = (2, 8, 32, 72, 128, 200)         # W8A8 at those scales: dense_w8a8_dp4a_rows against dense_w8a8_dp4a
ATTN = {"NB": 2, "H": 16, "c": 64, "pns": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}   # d16, last scale
ATTN_KERNELS = {   # name → (query rows, keys, threads per row, 4-float key loads, 4-float value loads),
    # None: the kernel's default; ("rows", bits): one thread per row, softmax weights on a `bits` grid or fp32
    "tiled": (16, 16, 4, None, None), "tiled_scalar": (16, 16, 4, False, False),
    "tiled_vector": (16, 16, 4, True, True), "tiled_32x32x4": (32, 32, 4, None, None),
    "tiled_16x32x8": (16, 32, 8, None, None), "tiled_8x16x4": (8, 16, 4, None, None),
    "tiled_8x8x4": (8, 8, 4, None, None), "rows": ("rows", None), "rows_a8": ("rows", 8)}
OPENCL_KERNELS = {"rows": True, "rows_scalar": False}   # name → 16-byte loads (the build's kernel) or not


def attention_inputs():
    """q NB×H×n×c and the KV cache (kv_layout) of the d16 attention problem, from a seed."""
    NB, H, c, pns = ATTN["NB"], ATTN["H"], ATTN["c"], ATTN["pns"]
    rng = np.random.default_rng(16)
    q = (rng.standard_normal((NB, H, pns[-1] ** 2, c)) / np.sqrt(np.sqrt(c))).astype(np.float32)
    kv = (rng.standard_normal((2, NB, H, sum(p * p for p in pns), c)) / np.sqrt(np.sqrt(c))).astype(np.float32)
    return q, kv


def inputs(M: int, K: int, O: int):
    """int8 activations and per-token scales, int8 weights and per-channel scales."""
    rng = np.random.default_rng(M + K + O)
    xq = rng.integers(-127, 128, (M, K), dtype=np.int8)
    sx = (rng.random((M, 1), dtype=np.float32) * 0.1 + 1e-3).astype(np.float32)
    q = rng.integers(-127, 128, (O, K), dtype=np.int8)
    s = (rng.random(O, dtype=np.float32) * 1e-2 + 1e-3).astype(np.float32)
    return xq, sx, q, s


def weight(kind: str, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight in each kernel's layout (pack_dp4a, as the compiler packs it; K×O for DLight)."""
    if kind in ("dp4a", "dp4a_rows"):
        return pack_dp4a(q)
    if kind == "dlight_int8":
        return np.ascontiguousarray(q.T)
    return np.ascontiguousarray((q.astype(np.float32) * s[:, None]).T)


def few_rows_inputs(M: int, K: int, O: int, kind: str = "rows"):
    """fp32 activations, weights (K×O, the GPU layout; float16 for kind rows_fp16) and bias of a
    dense layer."""
    rng = np.random.default_rng(M * 7 + K + O)
    x, w, b = (rng.standard_normal((M, K), dtype=np.float32), (rng.standard_normal((K, O), dtype=np.float32) / 32),
               rng.standard_normal(O, dtype=np.float32))
    return x, (w.astype(np.float16) if kind == "rows_fp16" else w), b


def build(target: str, out: Path, log=print):
    import os
    os.environ.setdefault("TVM_CUDA_NVCC_NO_FAST_MATH", "1")   # the kernels' own arithmetic, as built
    import tvm
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    import targets
    from compiler.build import check_cross_compiler, export, pipeline
    from compiler.lower.layers import placeholder
    from compiler.lower.params import param
    from schedules import matmul, qmatmul

    board = targets.load(target)
    if board.device not in ("cuda", "opencl"):
        raise UserError(f"--target {target}: runs kernels on {board.device}; this benchmark is for GPU boards")
    if board.device == "opencl":
        return build_opencl(board, out, log)
    check_cross_compiler(board)
    tvm_target = board.tvm_target()

    class Matmul(nn.Module):
        def __init__(self, kind, M, K, O, q, s):
            self.kind, self.shape = kind, (M, K, O)
            self.w, self.sw = param(weight(kind, q, s)), param(s)

        def forward(self, xq, sx):
            M, K, O = self.shape
            if self.kind in ("dp4a", "dp4a_rows"):
                kernel = qmatmul.dense_w8a8_dp4a_rows if self.kind == "dp4a_rows" else qmatmul.dense_w8a8_dp4a
                return op.tensor_ir_op(kernel(M, K, O), self.kind, [xq, sx, self.w, self.sw], placeholder([M, O]))
            if self.kind == "dlight_int8":
                acc = op.matmul(xq, self.w, out_dtype="int32")
                return op.multiply(op.multiply(op.astype(acc, "float32"), sx), self.sw)
            return op.matmul(op.multiply(op.astype(xq, "float32"), sx), self.w)

    class FewRows(nn.Module):
        def __init__(self, kind, M, K, O, w, b):
            self.kind, self.shape = kind, (M, K, O)
            self.w, self.b = param(w), param(b)

        def forward(self, x):
            M, K, O = self.shape
            if self.kind.startswith("rows"):
                return op.tensor_ir_op(matmul.dense_rows_gpu(M, K, O, wdtype=self.w.dtype), "dense_rows",
                                       [x, self.w, self.b], placeholder([M, O]))
            return op.add(op.matmul(x, self.w), self.b)

    def compile_to(module, inputs_spec, path):
        log(f"compiling {path.stem} for {target}")
        mod, _ = module.export_tvm(spec={"forward": inputs_spec | {"$": {"param_mode": "plain", "effect_mode": "none"}}})
        export(tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline(tvm_target)), board, path)  # cross-linked

    int8_spec = lambda M, K: {"xq": nn.spec.Tensor([M, K], "int8"), "sx": nn.spec.Tensor([M, 1], "float32")}  # noqa: E731
    few = [(M, K, O) for K, O in FEW_ROWS_LAYERS for M in FEW_ROWS]
    few_w8a8 = [(M, K, O) for K, O in FEW_ROWS_LAYERS for M in FEW_ROWS_W8A8]
    with new_dir(out) as tmp:
        for (M, K, O), kinds in [(shape, KINDS) for shape in SHAPES] + [(shape, ("dp4a_rows", "dp4a")) for shape in few_w8a8]:
            _, _, q, s = inputs(M, K, O)
            for kind in kinds:
                compile_to(Matmul(kind, M, K, O, q, s), int8_spec(M, K), tmp / f"{kind}_{M}x{K}x{O}.so")
        for M, K, O in few:
            for kind in FEW_ROWS_KINDS:
                _, w, b = few_rows_inputs(M, K, O, kind)
                compile_to(FewRows(kind, M, K, O, w, b), {"x": nn.spec.Tensor([M, K], "float32")},
                           tmp / f"few_{kind}_{M}x{K}x{O}.so")
        cases = build_attention(board, tmp, log)
        (tmp / "shapes.json").write_text(json.dumps({"target": target, "shapes": SHAPES, "kinds": KINDS,
                                                     "few_rows": few, "few_rows_w8a8": few_w8a8,
                                                     "attention": cases}))
    log(f"wrote {out}")


@contextmanager
def new_dir(out: Path):
    """A temporary directory beside `out`, renamed onto it when the block completes."""
    if out.exists() and not (out / "shapes.json").is_file():
        raise UserError(f"{out}: exists and is not a gpu_bench directory; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def attention_cases():
    """case → (window of the banded key scales or None, ASC share mode), as schedules/bench.py."""
    from schedules.bench import WINDOWS
    cases = {"dense": (None, None)} | {f"w{w}": (w, None) for w in WINDOWS}
    return cases | {f"w{WINDOWS[1]}_asc_{m}": (WINDOWS[1], m) for m in ("map", "output")}


def case_table(window, share) -> dict:
    """A case's window table, share mode and fraction of the dense problem's work (kept pairs)."""
    from schedules.bench import attention_case
    win, frac, _ = attention_case(ATTN["H"] * ATTN["c"], ATTN["H"], ATTN["pns"], window)
    return {"win": win.tolist(), "share": share, "work": frac * {None: 1.0, "map": 0.75, "output": 0.5}[share]}


def opencl_kernel(func, board) -> dict:
    """A TIR kernel as OpenCL C and what launching it takes: the kernel's name and its
    parameters in order (TVM orders them itself), for pyopencl."""
    import re

    import tvm
    ex = tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=board.tvm_target())
    mods, src = [ex.mod], None
    while mods:
        m = mods.pop()
        src = m.inspect_source("") if m.kind == "opencl" else src
        mods.extend(m.imports)
    kernels = re.findall(r"__kernel void (\w+)\(([^)]*)\)\s*\{", src or "")
    if len(kernels) != 1:
        raise UserError(f"--target {board.name}: expected one OpenCL kernel, TVM made {len(kernels)}")
    name, params = kernels[0]
    return {"source": src, "kernel": name,
            "args": [re.search(r"(\w+)_ptr$", p.strip()).group(1) for p in params.split(",")]}


def opencl_attention(board, NB: int, H: int, n: int, c: int, L: int, S: int, qs: int, share, vector=True,
                     map_bits=None) -> dict:
    """The OpenCL attention kernel (one thread per row) with its launch dimensions."""
    from schedules import attention
    f = attention._attention_rows(NB, H, n, c, L, S, qs, share, vector=vector, map_bits=map_bits)
    blocks, threads = attention.rows_launch(NB, H, n, share)
    return opencl_kernel(f, board) | {"global": blocks * threads, "local": threads}


def build_opencl(board, out: Path, log):
    NB, H, c, pns = ATTN["NB"], ATTN["H"], ATTN["c"], ATTN["pns"]
    S, qs, L = len(pns), len(pns) - 1, kv_layout.cache_len(pns)
    with new_dir(out) as tmp:
        table, kernels = {}, {}
        for case, (window, share) in attention_cases().items():
            table[case] = case_table(window, share)
            for kernel, vector in OPENCL_KERNELS.items():
                log(f"generating OpenCL attention {kernel} {case} for {board.name}")
                spec = opencl_attention(board, NB, H, pns[qs] ** 2, c, L, S, qs, share, vector)
                (tmp / f"attn_{kernel}_{case}.cl").write_text(spec.pop("source"))
                kernels[f"{kernel}_{case}"] = spec
        (tmp / "shapes.json").write_text(json.dumps({"target": board.name, "api": "opencl", "attention": table,
                                                     "opencl": kernels}))
    log(f"wrote {out}")


def opencl_queue():
    """A profiling queue on the first device of the first OpenCL platform."""
    try:
        import pyopencl as cl
        device = cl.get_platforms()[0].get_devices()[0]
    except Exception as e:  # noqa: BLE001  (no pyopencl, no ICD, no device)
        raise UserError(f"no OpenCL device here ({type(e).__name__}: {e}); install pyopencl and the "
                        "board's OpenCL driver (or pocl-opencl-icd on a PC)") from None
    ctx = cl.Context(devices=[device])
    return cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)


def opencl_launcher(queue, spec: dict, source: str, arrays: dict):
    """A function that runs the kernel once on `arrays` (name → numpy array; each kernel
    parameter `x` or its view `xf` takes arrays["x"]) and returns its event, and the device
    buffers by name; read results back with pyopencl.enqueue_copy."""
    import pyopencl as cl
    mf = cl.mem_flags
    kernel = getattr(cl.Program(queue.context, source).build(), spec["kernel"])
    bufs = {k: cl.Buffer(queue.context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a))
            for k, a in arrays.items()}
    kernel.set_args(*[bufs[a if a in bufs else a[:-1]] for a in spec["args"]])

    def launch():
        return cl.enqueue_nd_range_kernel(queue, kernel, (spec["global"],), (spec["local"],))
    return launch, bufs


def run_opencl(lib_dir: Path, meta: dict, number: int, log=print) -> list:
    """Check and time the OpenCL attention kernels on this machine's first OpenCL device."""
    import pyopencl as cl
    queue = opencl_queue()
    log(f"OpenCL device: {queue.device.name.strip()} ({queue.device.platform.name.strip()})")
    pns = ATTN["pns"]
    q, kv = attention_inputs()
    arrays = {"q": q, "kv": kv_layout.cache_of(kv, pns), "geom": kv_layout.scale_slots(pns),
              "out": np.zeros_like(q)}
    rows, dense_us = [], {}
    for case, spec in meta["attention"].items():     # "dense" first: the others are compared with it
        outputs, timed = {}, {}
        for kernel in OPENCL_KERNELS:
            name = f"{kernel}_{case}"
            launch, bufs = opencl_launcher(queue, meta["opencl"][name], (lib_dir / f"attn_{name}.cl").read_text(),
                                           arrays | {"win": np.array(spec["win"], np.int32)})
            launch().wait()
            outputs[kernel] = np.empty_like(q)
            cl.enqueue_copy(queue, outputs[kernel], bufs["out"]).wait()
            times = []
            for _ in range(5):
                events = [launch() for _ in range(number)]
                events[-1].wait()
                times.append((events[-1].profile.end - events[0].profile.start) / number / 1e3)
            timed[kernel] = float(np.median(times))
        want, against = ((reference_dense_attention(q, kv), "numpy") if case == "dense"
                         else (outputs["rows_scalar"], "rows_scalar"))
        rows += report(case, spec, outputs, timed, want, against, dense_us, log)
    return rows


def report(case, spec, outputs, timed, want, against, dense_us, log) -> list:
    """Rows of one attention case: each kernel's time, against its dense time and the kept work."""
    rows = []
    for kernel, us in timed.items():
        dense = dense_us.setdefault(kernel, us)
        diff = float(np.abs(outputs[kernel] - want).max())
        rows.append({"attention": case, "kernel": kernel, "us": us, "work": spec["work"], "max_diff": diff})
        log(f"attention {case:15} {kernel:14} {us:8.1f} µs  ÷ dense {us / dense:5.2f}"
            f"  ÷ kept work {us / dense / spec['work']:5.2f}  max diff vs {against} {diff:.1e}")
    return rows


def build_attention(board, out: Path, log) -> dict:
    """attn_<kernel>_<case>.so for every kernel and case; returns each case's window table,
    share mode and fraction of the dense problem's work (kept pairs; ASC as schedules/bench.py)."""
    import tvm

    from compiler.build import export
    from schedules import attention
    NB, H, c, pns = ATTN["NB"], ATTN["H"], ATTN["c"], ATTN["pns"]
    S, qs, L = len(pns), len(pns) - 1, kv_layout.cache_len(pns)
    table = {}
    for case, (window, share) in attention_cases().items():
        table[case] = case_table(window, share)
        for kernel, tile in ATTN_KERNELS.items():
            log(f"compiling attention {kernel} {case} for {board.name}")
            f = (attention._attention_rows(NB, H, pns[qs] ** 2, c, L, S, qs, share, map_bits=tile[1])
                 if tile[0] == "rows" else attention._attention_tiled(NB, H, pns[qs] ** 2, c, L, S, qs, share, True, *tile))
            ex = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}), target=board.tvm_target())
            export(ex, board, out / f"attn_{kernel}_{case}.so")
    return table


def reference_dense_attention(q, kv):
    s = np.einsum("bhic,bhjc->bhij", q.astype(np.float64), kv[0].astype(np.float64))
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bhjc->bhic", p / p.sum(-1, keepdims=True), kv[1].astype(np.float64))


def run_attention(lib_dir: Path, cases: dict, number: int, log=print) -> list:
    import tvm
    dev = tvm.cuda(0)
    pns = ATTN["pns"]
    q, kv = attention_inputs()
    args = [tvm.runtime.tensor(a, dev) for a in (q, kv_layout.cache_of(kv, pns))]
    geom = tvm.runtime.tensor(kv_layout.scale_slots(pns), dev)
    out = tvm.runtime.empty(q.shape, "float32", dev)
    rows, dense_us = [], {}
    for case, spec in cases.items():            # "dense" first: the others are compared with it
        win = tvm.runtime.tensor(np.array(spec["win"], np.int32), dev)
        outputs, timed = {}, {}
        for kernel in ATTN_KERNELS:
            f = tvm.runtime.load_module(str(lib_dir / f"attn_{kernel}_{case}.so"))
            f["f"](*args, win, geom, out)
            outputs[kernel] = out.numpy()
            timed[kernel] = f.time_evaluator("f", dev, number=number, repeat=5)(*args, win, geom, out).median * 1e6
        want, against = ((reference_dense_attention(q, kv), "numpy") if case == "dense"
                         else (outputs["rows"], "rows"))
        rows += report(case, spec, outputs, timed, want, against, dense_us, log)
    try:
        import torch
    except ImportError:
        return rows
    if not torch.cuda.is_available():          # a CPU build of PyTorch: no SDPA figure
        return rows
    qt, kt, vt = (torch.from_numpy(a).cuda() for a in (q, kv[0], kv[1]))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            sdpa(qt, kt, vt)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / number)
    rows.append({"attention": "dense", "kernel": "torch_sdpa_fp32", "us": float(np.median(times)), "work": 1.0})
    log(f"attention dense           torch SDPA fp32 {rows[-1]['us']:8.1f} µs")
    return rows


def run(lib_dir: Path, number: int, log=print) -> list:
    if not (lib_dir / "shapes.json").exists():
        raise UserError(f"{lib_dir}: no shapes.json (make it with: python -m schedules.gpu_bench build)")
    meta = json.loads((lib_dir / "shapes.json").read_text())
    if meta.get("api") == "opencl":             # pyopencl and numpy only
        return run_opencl(lib_dir, meta, number, log)
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from device.runtime import load_gpu_runtime
    load_gpu_runtime("cuda", lib_dir)
    dev = tvm.cuda(0)
    rows = []
    def timed(lib, arrays):
        """The library's output on `arrays` (inputs, then the weights: they are parameters) and µs a call."""
        vm = VirtualMachine(tvm.runtime.load_module(str(lib_dir / lib)), dev)
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        return vm["forward"](*args).numpy(), vm.time_evaluator("forward", dev, number=number, repeat=5)(*args).median * 1e6

    for key, row_key, kinds in (("shapes", "shape", KINDS), ("few_rows_w8a8", "few_rows_w8a8", ("dp4a_rows", "dp4a"))):
        for M, K, O in meta.get(key, []):
            xq, sx, q, s = inputs(M, K, O)
            exact = (xq.astype(np.int64) @ q.T.astype(np.int64)).astype(np.float32) * sx * s
            for kind in kinds:
                y, us = timed(f"{kind}_{M}x{K}x{O}.so", (xq, sx, weight(kind, q, s), s))
                rows.append({row_key: [M, K, O], "kernel": kind, "us": us, "tops": 2.0 * M * K * O / us / 1e6,
                             "equal_to_exact": float((y == exact).mean())})
                log(f"W8A8 {M}×{K}·{K}×{O} {kind:12} {us:9.1f} µs {rows[-1]['tops']:6.1f} TOPS  "
                    f"equal to the exact product: {rows[-1]['equal_to_exact']:.2%}")
    for M, K, O in meta.get("few_rows", []):
        for kind in FEW_ROWS_KINDS:
            x, w, b = few_rows_inputs(M, K, O, kind)
            want = x.astype(np.float64) @ w.astype(np.float64) + b
            y, us = timed(f"few_{kind}_{M}x{K}x{O}.so", (x, w, b))
            rows.append({"few_rows": [M, K, O], "kernel": kind, "us": us, "max_diff": float(np.abs(y - want).max())})
            log(f"dense {M}×{K}·{K}×{O} {kind:9} {us:8.1f} µs  max diff vs numpy {rows[-1]['max_diff']:.1e}")
    return rows + run_attention(lib_dir, meta.get("attention", {}), number, log)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m schedules.gpu_bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="compile the kernels here")
    b.add_argument("--target", default="h100", help="a CUDA board of targets/ (default h100)")
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="check and time them on the GPU")
    r.add_argument("dir", type=Path)
    r.add_argument("--number", type=int, default=100, help="calls per timed repeat (default 100)")
    r.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.verb == "build":
        build(args.target, args.out)
    else:
        rows = run(args.dir, args.number)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
