"""Time image generation on the board from a compiled artifact (TVM runtime and numpy only).

    python -m device.bench --artifact DIR [-n 10] [--warmup 2] [--class 207] [--top-k 1] [--out bench.json]

Runs `--warmup` untimed and `-n` timed generations of one batch, each with the decoder, and
prints the median seconds per image with the median time of every compiled function (scale_s,
next_s, decode, …); what is left is sampling on the board's CPU. --out writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from device.cliargs import add_sampler_args
from device.errors import UserError, cli
from device.fileio import atomic_path
from device.runtime import CompiledVAR
from device.sampling import make_rng


def bench(model: CompiledVAR, labels, n: int, warmup: int, cfg: float, top_k: int, top_p: float, seed: int = 0,
          log=print) -> dict:
    totals = []
    for k in range(warmup + n):
        model.timings = {} if k >= warmup else None
        t0 = time.perf_counter()
        model.generate(labels, cfg=cfg, top_k=top_k, top_p=top_p, rng=make_rng(seed + k))
        if k >= warmup:
            totals.append(time.perf_counter() - t0)
            calls = model.timings
            per_call = {name: sum(ts) for name, ts in calls.items()}
            if k == warmup:
                per_function = {name: [] for name in per_call}
            for name, t in per_call.items():
                per_function[name].append(t)
            log(f"image batch {k - warmup + 1}/{n}: {totals[-1]:.4f} s")
    model.timings = None
    med = statistics.median(totals)
    functions_ms = {name: 1e3 * statistics.median(ts) for name, ts in per_function.items()}
    return {"artifact_target": model.manifest["target"], "device": model.manifest.get("device", "cpu"),
            "batch": len(labels), "images_timed": n * len(labels),
            "median_s_per_image": med / len(labels), "min_s_per_image": min(totals) / len(labels),
            "functions_median_ms": functions_ms,
            "outside_functions_median_ms": 1e3 * med - sum(functions_ms.values())}


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m device.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, help="directory written by python -m compiler.build")
    ap.add_argument("-n", type=int, default=10, help="timed generations (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed generations first (default 2)")
    ap.add_argument("--class", dest="cls", type=int, default=0, help="class to generate (default 0)")
    add_sampler_args(ap)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        raise UserError("-n must be at least 1 and --warmup at least 0")
    t0 = time.perf_counter()
    model = CompiledVAR(args.artifact)
    load_s = time.perf_counter() - t0
    if model.kernels:
        print(f"kernels: {model.kernels}; artifact loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    if not 0 <= args.cls < model.num_classes:
        raise UserError(f"--class {args.cls}: the model has classes 0..{model.num_classes - 1}")
    r = bench(model, [args.cls] * model.batch, args.n, args.warmup, args.cfg, args.top_k, args.top_p, args.seed,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    r["load_s"], r["kernels"] = load_s, model.kernels
    print(f"{r['artifact_target']} ({r['device']}): {r['median_s_per_image'] * 1e3:.2f} ms/image median "
          f"over {r['images_timed']} images")
    for name, ms in r["functions_median_ms"].items():
        print(f"  {name:10s} {ms:9.3f} ms")
    print(f"  {'(sampling, copies)':10s} {r['outside_functions_median_ms']:9.3f} ms")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
