"""The main job end to end on the bundled demo model, with an emulated board standing in for a real one.

    python -m host.quickstart [--target jetson-orin] [--plan plans/demo-all.json] [--class 0 3 7]
                              [--out out/quickstart]

1. `compiler.build --target T`: the board's build (for jetson-orin: aarch64 host code cross-linked
   here and CUDA kernels for sm_87, compiled ahead of time when nvcc is installed);
2. `compiler.build --target T --device cpu`: the same board with everything on its CPU cores,
   which qemu can run (a GPU cannot be emulated here);
3. the PyTorch reference sampler's greedy tokens for the classes;
4. `host.deploy --emulate`: an emulated aarch64 board (host.emulate) runs the CPU build over TVM
   RPC, one greedy image per class, and its tokens are checked against the reference.
OUT gets the two artifacts, reference/ and board/ (PNGs, samples.npz, deploy.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from compiler.build import board_for, build, check_cross_compiler
from compiler.checkpoint import load_models
from compiler.compress.plan import load_plan
from compiler.errors import UserError, cli
from compiler.fileio import ensure_writable_dir
from compiler.sampler import generate
from device.output import save_samples
from host import deploy


def log(s):
    print(s, file=sys.stderr, flush=True)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m host.quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="jetson-orin", help="an aarch64 board of targets/ (default jetson-orin)")
    ap.add_argument("--plan", help="compression plan to build with (default: dense fp32)")
    ap.add_argument("--class", dest="classes", type=int, nargs="+", default=[0, 3, 7], metavar="C")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any board wait may take (default 300)")
    ap.add_argument("--out", type=Path, default=Path("out/quickstart"))
    args = ap.parse_args(argv)
    board = board_for(args.target)
    if not board.triple.startswith("aarch64"):
        raise UserError(f"--target {args.target}: the emulated board is aarch64; {board.name} is {board.triple}")
    check_cross_compiler(board)
    ensure_writable_dir(args.out)
    var, vae = load_models()
    plan = load_plan(args.plan, var.cfg) if args.plan else None
    bad = [c for c in args.classes if not 0 <= c < var.num_classes]
    if bad:
        raise UserError(f"--class {bad[0]}: the demo model has classes 0..{var.num_classes - 1}")

    steps = ["build", "build for the CPU cores", "reference", "emulated board"] if board.gpu else \
        ["build", "reference", "emulated board"]
    step = iter(f"[{i + 1}/{len(steps)}] {s}" for i, s in enumerate(steps))
    log(f"{next(step)}: {board.description}")
    built = build(var, vae, plan, board.name, 1, args.out / board.name, plan_path=args.plan, log=log)
    runnable = built
    if board.gpu:
        log(f"{next(step)}: the emulated board cannot run {board.device} kernels")
        runnable = build(var, vae, plan, board.name, 1, args.out / f"{board.name}-cpu", device="cpu",
                         plan_path=args.plan, log=log)

    log(f"{next(step)}: PyTorch reference sampler, greedy, classes {args.classes}")
    from compiler.compress.apply import apply_plan
    model = apply_plan(var, plan) if plan is not None else var
    toks, imgs = zip(*(generate(model, vae, [c], cfg=args.cfg, top_k=1, top_p=0.0) for c in args.classes))
    toks, imgs = np.concatenate([t.numpy() for t in toks]), np.concatenate([i.numpy() for i in imgs])
    save_samples(args.out / "reference", args.classes, toks, imgs, {"sampler": "compiler.sampler", "greedy": True},
                 cols=len(args.classes))

    log(f"{next(step)}: deploying {runnable} to an emulated aarch64 board (qemu-user)")
    # the undecorated main: a failure is this command's one-line error
    deploy.main.__wrapped__(["--artifact", str(runnable), "--emulate", "--class", *map(str, args.classes),
                 "--cfg", str(args.cfg), "--expect", str(args.out / "reference" / "samples.npz"),
                 "--timeout", str(args.timeout), "--out", str(args.out / "board")])
    print(f"built {built} for {board.name}; the board's images: {args.out / 'board' / 'grid.png'}")


if __name__ == "__main__":
    main()
