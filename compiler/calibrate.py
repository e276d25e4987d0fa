"""Calibrate LiteVAR compression and write the plan file the compiler reads.

    python -m compiler.calibrate [--var VAR --vae VAE] --samples 64 --out plan.json \\
        [--mdwa-threshold 0.95] [--asc-threshold 0.95 --asc-mode map] [--quant w8a8] [--protect ffn.fc2=fp16]

Generates --samples images (classes spread evenly) with the given sampling settings, measures
where attention mass lies and how alike the CFG halves attend, and picks MDWA windows, ASC
sharing and per-layer precision. Writes plan.json and, next to it, the raw statistics
(plan.stats.npz) that `--stats` reuses to try other thresholds without sampling again.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args, add_sampler_args
from compiler.compress.apply import attention_macs, kept_pair_fractions, weight_bytes
from compiler.compress.calibration import CalibrationStats, calibrate, plan_from_stats, spread_labels
from compiler.compress.plan import GROUP_SIZES, QUANT_SCHEMES
from compiler.errors import UserError, cli
from compiler.fileio import atomic_path


def parse_scheme(text: str, default_group: int, what: str):
    """'w4a16' or 'w4a16:64' → ('w4a16', 64); 'none'/'fp32' → ('fp32', None); 'fp16' → ('fp16', None)."""
    name, _, group = text.partition(":")
    name = "fp32" if name == "none" else name
    if name not in QUANT_SCHEMES:
        raise UserError(f"{what} {text!r}: unknown scheme, expected one of {QUANT_SCHEMES} (optionally :GROUP)")
    if not name.startswith("w4"):
        return name, None
    try:
        g = int(group) if group else default_group
    except ValueError:
        raise UserError(f"{what} {text!r}: group must be an integer") from None
    if g not in GROUP_SIZES:
        raise UserError(f"{what} {text!r}: group must be one of {GROUP_SIZES}")
    return name, g


def add_plan_args(ap):
    """Options that turn statistics into a plan (shared with the sensitivity sweep)."""
    ap.add_argument("--mdwa-threshold", type=float, default=0.95,
                    help="window must hold this share of its key block's attention mass (default 0.95)")
    ap.add_argument("--no-mdwa", action="store_true", help="keep attention dense")
    ap.add_argument("--dense-scales", type=int, default=3, help="query scales kept dense (default 3, as the paper)")
    ap.add_argument("--drop-share", type=float, default=0.0,
                    help="drop a coarser key scale holding less than this share of a query's mass (default 0: off)")
    ap.add_argument("--asc-threshold", type=float, default=0.95,
                    help="share attention where the CFG halves' similarity is at least this (default 0.95)")
    ap.add_argument("--no-asc", action="store_true", help="no attention sharing across CFG halves")
    ap.add_argument("--asc-mode", choices=["map", "output"], default="map",
                    help="reuse the conditional attention map (with the branch's own V) or its output")
    ap.add_argument("--quant", default="none", help="precision of all linear layers: none, w8a8, w4a16[:G], w4a8[:G]")
    ap.add_argument("--group", type=int, default=64, help="default int4 group size (32, 64 or 128)")
    ap.add_argument("--attention-bits", type=int, choices=[8], default=None,
                    help="quantize Q, K, V and the attention map to 8 bits")
    ap.add_argument("--protect", action="append", default=None, metavar="TYPE=SCHEME",
                    help="keep a layer type at another precision (default with --quant: ffn.fc2=fp16, "
                         "as LiteVAR's code keeps it); repeatable")


def plan_from_args(stats, cfg, args, info):
    quant = parse_scheme(args.quant, args.group, "--quant")
    protect = {}
    # by default a quantized plan keeps fc2 in 16 bit, as LiteVAR's released code does: half the
    # bytes of float32 at a logit KL of ~6e-8 on the demo model (docs/compression.md)
    default = ["ffn.fc2=fp16"] if quant[0] != "fp32" else []
    for spec in (args.protect if args.protect is not None else default):
        t, _, sch = spec.partition("=")
        if not sch:
            raise UserError(f"--protect {spec!r}: expected TYPE=SCHEME, e.g. ffn.fc2=w8a8")
        protect[t] = parse_scheme(sch, args.group, f"--protect {t}")
    if quant[0] == "fp32" and all(s == "fp32" for s, _ in protect.values()):
        quant, protect = None, None
    if not 0 < args.mdwa_threshold <= 1:
        raise UserError(f"--mdwa-threshold must be in (0, 1], got {args.mdwa_threshold}")
    if not 0 <= args.asc_threshold <= 1:
        raise UserError(f"--asc-threshold must be in [0, 1] (0 shares everywhere), got {args.asc_threshold}")
    return plan_from_stats(stats, cfg, mdwa_threshold=None if args.no_mdwa else args.mdwa_threshold,
                           dense_scales=args.dense_scales, drop_share=args.drop_share,
                           asc_threshold=None if args.no_asc else args.asc_threshold, asc_mode=args.asc_mode,
                           quant=quant, protect=protect, attention_bits=args.attention_bits, info=info)


def summary(var, plan) -> str:
    cfg = var.cfg
    lines = []
    if plan.windows is not None:
        lines.append("MDWA kept pairs per query scale (all blocks and heads):")
        per_scale, overall = kept_pair_fractions(cfg, plan)
        for q, (pn, frac) in enumerate(zip(cfg.patch_nums, per_scale)):
            lines.append(f"  scale {q:2d} ({pn:2d}×{pn:<2d}): {frac:6.1%}")
        lines.append(f"  overall: {overall:.1%} of query-key pairs kept")
    if plan.asc_share is not None:
        n = sum(map(sum, plan.asc_share))
        lines.append(f"ASC ({plan.asc_mode}): {n} of {cfg.depth * len(cfg.patch_nums)} (block, scale) pairs shared")
    dense, planned = attention_macs(cfg, plan)
    fp16, q = weight_bytes(var, plan)
    lines.append(f"attention multiply-adds removed: {1 - planned / dense:.1%}; weight bytes vs fp16: {q / fp16:.3f}")
    return "\n".join(lines)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.calibrate", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--samples", type=int, default=64, help="calibration images (default 64)")
    add_sampler_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stats", type=Path, help="reuse the statistics of an earlier calibration instead of sampling")
    add_plan_args(ap)
    ap.add_argument("--out", type=Path, required=True, help="plan file to write (plan.json)")
    args = ap.parse_args(argv)

    var, vae = load_models(args.var, args.vae)
    stats_path = args.out.with_suffix(".stats.npz")
    if args.stats:
        try:
            stats = CalibrationStats.load(args.stats)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{args.stats}: not a calibration statistics file ({e})") from None
        if stats.block_mass.shape[:3] != (var.cfg.depth, var.cfg.heads, len(var.cfg.patch_nums)):
            raise UserError(f"{args.stats}: statistics for another model shape {stats.block_mass.shape[:3]}")
        info = {"stats": os.path.relpath(args.stats.resolve(), args.out.resolve().parent)}
    else:
        if args.samples < 1:
            raise UserError(f"--samples must be at least 1, got {args.samples}")
        labels = spread_labels(args.samples, var.num_classes)
        with tqdm(total=len(labels), desc="calibrating", unit="img") as bar:
            stats = calibrate(var, vae, labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              batch=args.batch, progress=bar.update)
        with atomic_path(stats_path) as tmp:
            stats.save(tmp)
        info = {"samples": args.samples, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.seed, "stats": stats_path.name}
    plan = plan_from_args(stats, var.cfg, args, info)
    plan.save(args.out)
    print(summary(var, plan))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
