"""Time image generation on the board from a compiled artifact (TVM runtime and numpy only).

    python -m device.bench --artifact DIR [--artifact DIR2 …] [-n 10] [--warmup 2] [--class 207] [--top-k 1]
                           [--numpy-sampler-too] [--out bench.json]

Runs `--warmup` untimed and `-n` timed generations of one batch, each with the decoder, and
prints the median seconds per image with the median time of every compiled function (scale_s,
next_s, sample_s, decode, …); what is left is the Python loop, copies and, for artifacts
without a compiled sampler, numpy's sampling. Several artifacts are timed
side by side (interleaved) with their ratio to the first; --numpy-sampler-too adds, for each
artifact with a compiled sampler (sample_<s>), a run of it that samples with device/sampling.py
instead. --out writes the same as JSON.
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
    return bench_many([model], labels, n, warmup, cfg, top_k, top_p, seed, log)[0]


def bench_many(models: list[CompiledVAR], labels, n: int, warmup: int, cfg: float, top_k: int, top_p: float,
               seed: int = 0, log=print, numpy_sampler: list[bool] | None = None) -> list[dict]:
    """Time the models side by side: generation k runs on every model before k+1 starts, so the
    load of a shared machine hits them alike. numpy_sampler[m]: model m samples with numpy even
    if it has a compiled sampler (the same model may be listed twice)."""
    totals = [[] for _ in models]
    per_function = [{} for _ in models]
    own = [model.kernel_sampler for model in models]
    numpy_sampler = numpy_sampler or [False] * len(models)
    for k in range(warmup + n):
        for m, model in enumerate(models):
            model.timings = {} if k >= warmup else None
            model.kernel_sampler = own[m] and not numpy_sampler[m]
            t0 = time.perf_counter()
            model.generate(labels, cfg=cfg, top_k=top_k, top_p=top_p, rng=make_rng(seed + k))
            if k < warmup:
                continue
            totals[m].append(time.perf_counter() - t0)
            for name, ts in model.timings.items():
                per_function[m].setdefault(name, []).append(sum(ts))
            log(f"image batch {k - warmup + 1}/{n}, artifact {m + 1}: {totals[m][-1]:.4f} s")
    results = []
    for m, (model, t, fns) in enumerate(zip(models, totals, per_function)):
        model.timings, model.kernel_sampler = None, own[m]
        med = statistics.median(t)
        functions_ms = {name: 1e3 * statistics.median(ts) for name, ts in fns.items()}
        results.append({"artifact_target": model.manifest["target"], "device": model.manifest.get("device", "cpu"),
                        "tuning": model.manifest.get("tuning"), "cuda_graph": bool(model.manifest.get("cuda_graph")),
                        "sampler": "kernel" if own[m] and not numpy_sampler[m] else "numpy",
                        "batch": len(labels), "images_timed": n * len(labels),
                        "median_s_per_image": med / len(labels), "min_s_per_image": min(t) / len(labels),
                        "functions_median_ms": functions_ms,
                        "outside_functions_median_ms": 1e3 * med - sum(functions_ms.values())})
    return results


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m device.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, action="append",
                    help="directory written by python -m compiler.build; give it again to time several side by side")
    ap.add_argument("-n", type=int, default=10, help="timed generations (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed generations first (default 2)")
    ap.add_argument("--class", dest="cls", type=int, default=0, help="class to generate (default 0)")
    add_sampler_args(ap)
    ap.add_argument("--numpy-sampler-too", action="store_true",
                    help="also time each artifact that has a compiled sampler with device/sampling.py instead")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        raise UserError("-n must be at least 1 and --warmup at least 0")
    models, loads = [], []
    for path in args.artifact:
        t0 = time.perf_counter()
        models.append(CompiledVAR(path))
        loads.append(time.perf_counter() - t0)
        if models[-1].kernels:
            print(f"kernels: {models[-1].kernels}; artifact loaded in {loads[-1]:.1f} s", file=sys.stderr, flush=True)
    first = models[0]
    if not 0 <= args.cls < first.num_classes:
        raise UserError(f"--class {args.cls}: the model has classes 0..{first.num_classes - 1}")
    batches = {m.batch for m in models}
    if len(batches) > 1:
        raise UserError(f"--artifact: the artifacts are built for different batches {sorted(batches)}")
    paths, numpy_sampler = list(args.artifact), [False] * len(models)
    if args.numpy_sampler_too:
        twins = [(p, m, t) for p, m, t in zip(args.artifact, models, loads) if m.kernel_sampler]
        if not twins:
            raise UserError("--numpy-sampler-too: no --artifact has a compiled sampler (rebuild it)")
        paths += [p for p, _, _ in twins]
        models += [m for _, m, _ in twins]
        loads += [t for _, _, t in twins]
        numpy_sampler += [True] * len(twins)
    results = bench_many(models, [args.cls] * first.batch, args.n, args.warmup, args.cfg, args.top_k, args.top_p,
                         args.seed, log=lambda s: print(s, file=sys.stderr, flush=True), numpy_sampler=numpy_sampler)
    for path, r, load_s, model in zip(paths, results, loads, models):
        r["artifact"], r["load_s"], r["kernels"] = str(path), load_s, model.kernels
        how = r["device"] + (", tuned" if r["tuning"] else "") + (", CUDA graphs" if r["cuda_graph"] else "")
        print(f"{path}: {r['artifact_target']} ({how}, {r['sampler']} sampler): "
              f"{r['median_s_per_image'] * 1e3:.2f} ms/image median over {r['images_timed']} images"
              + (f", {results[0]['median_s_per_image'] / r['median_s_per_image']:.2f}x the first"
                 if r is not results[0] else ""))
        for name, ms in r["functions_median_ms"].items():
            print(f"  {name:10s} {ms:9.3f} ms")
        print(f"  {'(rest)':10s} {r['outside_functions_median_ms']:9.3f} ms   (loop, copies; numpy's sampling)")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))

if __name__ == "__main__":
    main()
