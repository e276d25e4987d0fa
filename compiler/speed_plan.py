"""A uniform plan for speed measurements on checkpoints that cannot be calibrated.

    python -m compiler.speed_plan --model d16 --window 16 --out plans/d16-speed.json

Random-valued official-format checkpoints (what `host.bench --model d16` times) have no
attention structure for compiler.calibrate to find, yet the compiled plan's cost depends only
on which pairs and layers it keeps. This plan keeps what a calibrated LiteVAR plan typically
keeps: query scales 0–4 dense; from scale 5 on, key scales 0–2 dense and a band of `--window`
on the others; ASC from scale 6; every linear layer W8A8 but ffn.fc2, the paper's protected
layer, which keeps float16 weights as the paper's code keeps it in 16 bit (`--fc2 fp32` keeps
float32 weights, as this plan did until November 2026; `--fc2 w8a8` quantizes it too, to
measure what that protection costs). Its images mean
nothing; its FLOPs and timings are those of such a plan.
"""
from __future__ import annotations

import argparse

from compiler.compress.plan import Plan, linear_layer_names
from compiler.errors import UserError, cli
from compiler.official import load_reference

DENSE_QUERY_SCALES = 5
DENSE_KEY_SCALES = 3
ASC_FROM = 6


def speed_plan(cfg, window: int, asc_mode: str = "output", quant: str = "w8a8", fc2: str = "fp16") -> Plan:
    plan = Plan.empty(cfg)
    S = len(cfg.patch_nums)
    per_head = [[None] * (q + 1) if q < DENSE_QUERY_SCALES else
                [None if k < DENSE_KEY_SCALES else window for k in range(q + 1)] for q in range(S)]
    plan.windows = [[[list(ws) for ws in per_head] for _ in range(cfg.heads)] for _ in range(cfg.depth)]
    plan.asc_share = [[s >= ASC_FROM for s in range(S)] for _ in range(cfg.depth)]
    plan.asc_mode = asc_mode
    for name in linear_layer_names(cfg):
        scheme = fc2 if name.endswith("ffn.fc2") else quant
        if scheme != "fp32":
            plan.quant_layers[name] = {"scheme": scheme, "group": None}
    plan.calibration = {"note": "uniform speed-test plan (compiler.speed_plan), not calibrated",
                        "window": window}
    return plan


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.speed_plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "d16"), default="d16")
    ap.add_argument("--window", type=int, default=16, help="band half-width on the fine key scales (default 16)")
    ap.add_argument("--asc-mode", choices=("map", "output"), default="output")
    ap.add_argument("--quant", choices=("fp32", "w8a8"), default="w8a8", help="all layers but ffn.fc2")
    ap.add_argument("--fc2", choices=("fp32", "fp16", "w8a8"), default="fp16",
                    help="ffn.fc2, which LiteVAR keeps in 16 bit (default fp16)")
    ap.add_argument("--out", required=True, help="plan file to write")
    args = ap.parse_args(argv)
    if args.window < 1:
        raise UserError(f"--window must be at least 1, got {args.window}")
    var, _ = load_reference(args.model)
    speed_plan(var.cfg, args.window, args.asc_mode, args.quant, args.fc2).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
