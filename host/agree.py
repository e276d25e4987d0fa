"""Does the compiled build give the reference's images? Greedy generation with the PyTorch
reference and with a build of the same weights (a plan, if any, simulated in PyTorch).

    python -m host.agree [--model demo|d16] [--depth N] [--plan plan.json] [--artifact DIR] \\
        [--class 0 3 …] [--cfg 4]

Prints the fraction of equal tokens and the largest image difference. Without --artifact the
build is made in a temporary directory. `--model d16` uses an official-format d16 with seeded
random values (`--depth` cuts it to its first N blocks, to keep the run short).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from compiler.errors import UserError, cli
from compiler.official import load_reference


def agreement(var, vae, plan, artifact, labels, cfg):
    """(token agreement, max |image difference|) of greedy generation, compiled vs PyTorch."""
    from compiler.compress.apply import apply_plan
    from compiler.sampler import generate
    from device.runtime import CompiledVAR
    ref = apply_plan(var, plan) if plan is not None else var
    want_t, want_i = generate(ref, vae, labels, cfg=cfg, top_k=1, top_p=0.0)
    model = CompiledVAR(artifact)
    got = [model.generate(labels[i:i + model.batch], cfg=cfg, top_k=1, top_p=0.0)
           for i in range(0, len(labels), model.batch)]
    got_t = np.concatenate([t for t, _ in got])
    got_i = np.concatenate([i for _, i in got])
    return float((got_t == want_t.numpy()).mean()), float(np.abs(got_i - want_i.numpy()).max())


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m host.agree", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "d16"), default="demo")
    ap.add_argument("--depth", type=int, help="d16 only: keep the first N blocks")
    ap.add_argument("--plan", help="compression plan (the reference then simulates it)")
    ap.add_argument("--artifact", type=Path, help="an existing build of the same weights and plan")
    ap.add_argument("--target", default="host")
    ap.add_argument("--class", dest="classes", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--cfg", type=float, default=4.0)
    args = ap.parse_args(argv)
    if args.depth is not None and args.model != "d16":
        raise UserError("--depth applies to --model d16 only")
    from compiler.build import build, check_compilable
    from compiler.compress.plan import load_plan
    var, vae = load_reference(args.model, args.depth)
    plan = None
    if args.plan:
        plan = load_plan(args.plan, var.cfg)
        check_compilable(plan, args.plan)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="agree-") as work:
        artifact = args.artifact or build(var, vae, plan, args.target, 1, Path(work) / "art", log=log)
        tokens, image_diff = agreement(var, vae, plan, artifact, args.classes, args.cfg)
    print(f"greedy token agreement {tokens:.4f}, max image difference {image_diff:.3g} "
          f"({len(args.classes)} images, cfg {args.cfg})")


if __name__ == "__main__":
    main()
