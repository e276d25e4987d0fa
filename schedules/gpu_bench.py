"""W8A8 matmuls on a CUDA GPU: our dp4a kernel against DLight's int8 matmul and an fp32 matmul.

    python -m schedules.gpu_bench build --target h100 --out DIR   # here: one library per kernel and shape
    python -m schedules.gpu_bench run DIR                         # on the GPU machine (TVM runtime + numpy)

The shapes are d16's at the last scales (qkv, proj, fc2), activations already quantized. Inputs
come from seeds on both sides, so DIR holds only the libraries; `run` checks each int8 kernel
against the exact integer product (numpy int64) scaled as the simulation does, and times the
three side by side.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from device.errors import UserError, cli
from schedules.packing import pack_dp4a  # numpy only: `run` has just the TVM runtime

SHAPES = ((512, 1024, 3072), (338, 1024, 1024), (512, 4096, 1024))
KINDS = ("dp4a", "dlight_int8", "dlight_fp32")


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
    if kind == "dp4a":
        return pack_dp4a(q)
    if kind == "dlight_int8":
        return np.ascontiguousarray(q.T)
    return np.ascontiguousarray((q.astype(np.float32) * s[:, None]).T)


def build(target: str, out: Path, log=print):
    import os
    os.environ.setdefault("TVM_CUDA_NVCC_NO_FAST_MATH", "1")   # the kernels' own arithmetic, as built
    import tvm
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    import targets
    from compiler.build import pipeline
    from compiler.lower.layers import placeholder
    from compiler.lower.params import param
    from schedules import qmatmul

    board = targets.load(target)
    if board.device != "cuda":
        raise UserError(f"--target {target}: runs kernels on {board.device}; this benchmark is for CUDA boards")
    tvm_target = board.tvm_target()

    class Matmul(nn.Module):
        def __init__(self, kind, M, K, O, q, s):
            self.kind, self.shape = kind, (M, K, O)
            self.w, self.sw = param(weight(kind, q, s)), param(s)

        def forward(self, xq, sx):
            M, K, O = self.shape
            if self.kind == "dp4a":
                return op.tensor_ir_op(qmatmul.dense_w8a8_dp4a(M, K, O), "dense_w8a8_dp4a",
                                       [xq, sx, self.w, self.sw], placeholder([M, O]))
            if self.kind == "dlight_int8":
                acc = op.matmul(xq, self.w, out_dtype="int32")
                return op.multiply(op.multiply(op.astype(acc, "float32"), sx), self.sw)
            return op.matmul(op.multiply(op.astype(xq, "float32"), sx), self.w)

    if out.exists() and not (out / "shapes.json").is_file():
        raise UserError(f"{out}: exists and is not a gpu_bench directory; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))   # renamed onto `out` when complete
    try:
        for M, K, O in SHAPES:
            _, _, q, s = inputs(M, K, O)
            for kind in KINDS:
                log(f"compiling {kind} {M}×{K}·{K}×{O} for {target}")
                mod, _ = Matmul(kind, M, K, O, q, s).export_tvm(spec={"forward": {
                    "xq": nn.spec.Tensor([M, K], "int8"), "sx": nn.spec.Tensor([M, 1], "float32"),
                    "$": {"param_mode": "plain", "effect_mode": "none"}}})
                ex = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline(tvm_target))
                ex.export_library(str(tmp / f"{kind}_{M}x{K}x{O}.so"))
        (tmp / "shapes.json").write_text(json.dumps({"target": target, "shapes": SHAPES, "kinds": KINDS}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"wrote {out}")


def run(lib_dir: Path, number: int, log=print) -> list:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from device.runtime import load_gpu_runtime
    if not (lib_dir / "shapes.json").exists():
        raise UserError(f"{lib_dir}: no shapes.json (make it with: python -m schedules.gpu_bench build)")
    load_gpu_runtime("cuda", lib_dir)
    dev = tvm.cuda(0)
    rows = []
    for M, K, O in json.loads((lib_dir / "shapes.json").read_text())["shapes"]:
        xq, sx, q, s = inputs(M, K, O)
        exact = (xq.astype(np.int64) @ q.T.astype(np.int64)).astype(np.float32) * sx * s
        for kind in KINDS:
            vm = VirtualMachine(tvm.runtime.load_module(str(lib_dir / f"{kind}_{M}x{K}x{O}.so")), dev)
            args = [tvm.runtime.tensor(a, dev) for a in (xq, sx, weight(kind, q, s), s)]
            y = vm["forward"](*args).numpy()
            us = vm.time_evaluator("forward", dev, number=number, repeat=5)(*args).median * 1e6
            rows.append({"shape": [M, K, O], "kernel": kind, "us": us, "tops": 2.0 * M * K * O / us / 1e6,
                         "equal_to_exact": float((y == exact).mean())})
            log(f"{M}×{K}·{K}×{O} {kind:12} {us:9.1f} µs {rows[-1]['tops']:6.1f} TOPS  "
                f"equal to the exact product: {rows[-1]['equal_to_exact']:.2%}")
    return rows


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
    args = ap.parse_args(argv)
    if args.verb == "build":
        build(args.target, args.out)
    else:
        run(args.dir, args.number)


if __name__ == "__main__":
    main()
