"""Sampling options shared by every command that generates images, on the build machine
(compiler.sample, calibrate, evaluate, sensitivity) and on the board (device.generate)."""
from __future__ import annotations

import argparse

from device.errors import UserError


def add_sampler_args(ap):
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance at the last scale (default 4)")
    ap.add_argument("--top-k", type=int, default=900, help="keep the k most likely tokens; 1 is greedy (default 900)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus threshold, 0 disables (default 0.95)")
    ap.add_argument("--seed", type=int, default=0)


def add_sampling_args(ap: argparse.ArgumentParser):
    """The sampling options shared by every command that generates images."""
    ap.add_argument("--class", dest="classes", type=int, nargs="+", default=[3], metavar="C",
                    help="class ids to sample; the grid has one column per class and one row per -n")
    ap.add_argument("-n", "--per-class", type=int, default=1, help="images per class (default 1)")
    add_sampler_args(ap)


def labels_from_args(args, num_classes: int) -> list:
    if args.per_class < 1:
        raise UserError(f"-n/--per-class must be at least 1, got {args.per_class}")
    if args.top_k < 0 or not 0 <= args.top_p <= 1:
        raise UserError(f"--top-k must be >= 0 and --top-p in [0, 1], got {args.top_k} and {args.top_p}")
    for c in args.classes:
        if not 0 <= c < num_classes:
            raise UserError(f"--class {c}: out of range, this model has classes 0..{num_classes - 1}")
    return [c for _ in range(args.per_class) for c in args.classes]  # one row per draw
