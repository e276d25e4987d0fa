"""Per-image generation time and peak memory of each engine, measured side by side in one run.

    python -m host.bench --target host [--model demo|d16] [--plan plans/demo-all.json] \\
        [--images 5] [--dense-artifact DIR --plan-artifact DIR --onnx DIR [--onnx-shared-weights]] \\
        [--keep-artifacts DIR] --out bench.json

Engines: the PyTorch eager reference (fp32), ONNX Runtime on the exported graphs
(compiler.export_onnx), the compiled dense build and the compiled plan build; batch 1, CFG, ten scales, decoder included, top-k 900 / top-p 0.95 sampling. Images are
interleaved (engine A, B, C, A, B, C, …) so that load on this shared machine hits every engine
alike, each timed after a pause and an untimed image of its own (timed_images); the median is
reported, and each engine's speed-up over PyTorch round by round (its median and range show how
much one run's ratio of medians can move on a noisy machine). Peak memory is the resident-set high-water mark of a separate
process per engine that loads it and generates one image. Artifacts and the ONNX export are
made when not given.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compiler.errors import UserError, cli
from compiler.fileio import atomic_path
from compiler.official import load_reference
from device.cores import settle

ENGINES = ("pytorch", "onnxruntime", "tvm_dense", "tvm_plan")
DEFAULT_PLAN = {"demo": "plans/demo-all.json", "d16": None}


def make_engine(name: str, var, vae, artifacts: dict, onnx_prepacking: bool = True):
    """A function generating one image of class c (sampling, seed s)."""
    if name == "pytorch":
        from compiler.sampler import generate
        return lambda c, s: generate(var, vae, [c], seed=s)
    from device.sampling import make_rng
    if name == "onnxruntime":
        from host.onnx_engine import OnnxVAR
        model = OnnxVAR(artifacts[name], prepacking=onnx_prepacking)
        return lambda c, s: model.generate([c], rng=make_rng(s))
    from device.runtime import CompiledVAR
    model = CompiledVAR(artifacts[name])
    return lambda c, s: model.generate([c], rng=make_rng(s))


def vm_hwm_mb() -> float:
    """This process's resident high-water mark. /proc's VmHWM, not ru_maxrss: a child started
    from a big parent inherits the parent's ru_maxrss across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(name: str, args) -> float:
    """Run one image of `name` in a fresh process and return its resident high-water mark."""
    cmd = [sys.executable, "-m", "host.bench", "--model", args.model, "--memory-of", name,
           "--dense-artifact", str(args.dense_artifact), "--plan-artifact", str(args.plan_artifact),
           "--onnx", str(args.onnx), "--out", "-"] + ["--onnx-shared-weights"] * args.onnx_shared_weights
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise UserError(f"memory run of {name} failed: {r.stderr.strip().splitlines()[-1:]}")
    return float(r.stdout.strip().splitlines()[-1])


def ensure_artifacts(args, var, vae, work: Path, log):
    """Build into `work` the artifacts not given on the command line."""
    from compiler.build import build, check_compilable
    from compiler.compress.plan import load_plan
    from compiler.export_onnx import export
    if args.onnx is None and "onnxruntime" in args.engines:
        log("exporting the ONNX graphs")
        args.onnx = export(var, vae, 1, work / "onnx", log=log)
    if args.dense_artifact is None and "tvm_dense" in args.engines:
        log("building the dense artifact")
        args.dense_artifact = build(var, vae, None, args.target, 1, work / "dense", log=log)
    if args.plan_artifact is None and "tvm_plan" in args.engines:
        plan_path = args.plan or DEFAULT_PLAN[args.model]
        if plan_path is None:
            raise UserError(f"--model {args.model}: give --plan (or --plan-artifact)")
        plan = load_plan(plan_path, var.cfg)
        check_compilable(plan, plan_path)
        log(f"building the plan artifact ({plan_path})")
        args.plan_artifact = build(var, vae, plan, args.target, 1, work / "plan", plan_path=plan_path, log=log)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m host.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="host")
    ap.add_argument("--model", choices=("demo", "d16"), default="demo",
                    help="demo: the bundled model; d16: an official-format d16 with random values")
    ap.add_argument("--plan", help="plan for the plan build (default for demo: plans/demo-all.json)")
    ap.add_argument("--images", type=int, default=5, help="images per engine (median reported; at least 5)")
    ap.add_argument("--dense-artifact", type=Path, help="reuse a dense build of the same model")
    ap.add_argument("--plan-artifact", type=Path, help="reuse a plan build of the same model")
    ap.add_argument("--onnx", type=Path, help="reuse an ONNX export of the same model (compiler.export_onnx)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated engines to time (default all: {','.join(ENGINES)}); pytorch is the baseline "
                         "and always runs. ONNX Runtime runs at its usual speed: each of its sessions prepacks "
                         "the MatMul/Gemm/Conv weights it multiplies by, about one copy of the transformer per scale")
    ap.add_argument("--onnx-shared-weights", action="store_true",
                    help="ONNX Runtime without weight prepacking: all its sessions share one in-memory copy of the "
                         "export's weights.bin (demo: ~10%% slower, less memory)")
    ap.add_argument("--keep-artifacts", type=Path,
                    help="build the artifacts and export not given into this new directory and keep them (to give "
                         "them next time, or to device.bench), instead of a temporary one")
    ap.add_argument("--memory-of", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True, help="bench.json to write")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.memory_of:  # child process: one image, then report the high-water mark
        if args.memory_of.startswith("tvm"):  # a board process: no PyTorch, no reference model
            sys.modules["torch"] = None
            var = vae = None
        else:
            var, vae = load_reference(args.model)
        make_engine(args.memory_of, var, vae, {"tvm_dense": args.dense_artifact, "tvm_plan": args.plan_artifact,
                                               "onnxruntime": args.onnx}, not args.onnx_shared_weights)(3, 0)
        print(vm_hwm_mb())
        return

    if args.images < 5:
        raise UserError(f"--images must be at least 5 for a median, got {args.images}")
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in ENGINES]
    if unknown:
        raise UserError(f"--engines: unknown engine {unknown[0]!r}; known: {', '.join(ENGINES)}")
    args.engines = tuple(e for e in ENGINES if e in chosen or e == "pytorch")
    keep = args.keep_artifacts
    if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise UserError(f"--keep-artifacts {keep}: exists and is not an empty directory")
    var, vae = load_reference(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as work:
        ensure_artifacts(args, var, vae, keep or Path(work), log)
        if keep is not None:
            log(f"artifacts kept in {keep}: " + ", ".join(f"{flag} {path}" for flag, path in (
                ("--dense-artifact", args.dense_artifact), ("--plan-artifact", args.plan_artifact),
                ("--onnx", args.onnx)) if path is not None))
        result = measure(args, var, vae, log)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    for name in args.engines:
        rounds = result["speedup_per_round"].get(name)
        spread = (f"; per round {rounds['min']:.2f}–{rounds['max']:.2f}x, median {rounds['median']:.2f}x"
                  if rounds else "")
        print(f"{name:10s} {result['all_median_s'][name]:.3f} s/image  peak {result['peak_mb'][name]:.0f} MB  "
              f"({result['pytorch_s'] / result['all_median_s'][name]:.2f}x PyTorch{spread})")


def timed_images(engines: dict, images: int, classes: int, log=print, quiet_cores: bool = True) -> dict:
    """name → seconds of each of `images` images, engines interleaved (A, B, C, A, …). Each is
    timed in the engine's steady state: after a pause in which the last engine's threads stop
    spinning (device.cores.settle) and an untimed image of its own that wakes its threads
    (PyTorch's first call after a pause took up to 3× its time). quiet_cores=False: neither, for
    engines that leave no CPU threads spinning (GPU engines, whose calls return synchronised)."""
    times = {name: [] for name in engines}
    for i in range(images):
        for name, run in engines.items():
            if quiet_cores:
                settle()
                run(i % classes, i)
            t0 = time.perf_counter()
            run(i % classes, i)
            times[name].append(time.perf_counter() - t0)
            log(f"image {i + 1}/{images} {name}: {times[name][-1]:.3f} s")
    return times


def round_speedups(times: dict, base: str = "pytorch") -> dict:
    """name → base's time ÷ the engine's, image by image (the same round of timed_images), with
    their median and range: how far one draw on this noisy machine can move the ratio of medians."""
    out = {}
    for name, ts in times.items():
        if name != base:
            per = [b / t for b, t in zip(times[base], ts)]
            out[name] = {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}
    return out


def measure(args, var, vae, log) -> dict:
    artifacts = {"tvm_dense": args.dense_artifact, "tvm_plan": args.plan_artifact, "onnxruntime": args.onnx}
    # Peak memory first, while this process holds only the reference: freed engines do not give
    # their memory back to the system, and at d16 the timing process (ONNX Runtime's prepacked
    # sessions alone ~12 GB) plus a memory child ran this 24 GB machine out of memory.
    peak = {}
    for name in args.engines:
        log(f"peak memory of {name} (one image in a process of its own) …")
        peak[name] = peak_rss_mb(name, args)
    engines = {name: make_engine(name, var, vae, artifacts, not args.onnx_shared_weights) for name in args.engines}
    for name, run in engines.items():  # warm-up: first-call allocations and caches
        run(0, 0)
    times = timed_images(engines, args.images, var.cfg.num_classes, log)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": args.model, "target": args.target, "images": args.images, "batch": 1, "cfg": 4.0,
        "pytorch_s": med["pytorch"], "onnxruntime_s": med.get("onnxruntime"), "tvm_dense_s": med.get("tvm_dense"),
        "tvm_plan_s": med.get("tvm_plan"), "peak_mb": peak,
        "onnxruntime_prepacking": not args.onnx_shared_weights if "onnxruntime" in med else None,
        "speedup_vs_pytorch": {n: med["pytorch"] / med[n] for n in med if n != "pytorch"},
        "speedup_per_round": round_speedups(times),
        "tvm_dense_vs_onnxruntime": (med["onnxruntime"] / med["tvm_dense"]
                                     if "onnxruntime" in med and "tvm_dense" in med else None),
        "all_median_s": med, "all_s": times,
    }


if __name__ == "__main__":
    main()
