"""Profile an artifact on a board (or here): per-scale latency, per-kernel time, memory, roofline.

    python -m host.profile --artifact DIR [--rpc HOST:PORT | --tracker HOST:PORT [--key K]]
                           [-n 5] [--class 3] [--top-k 900 --top-p 0.95] --out DIR

Runs one warm-up and N generations (batch of the artifact, decoder included) and writes
DIR/profile.json, DIR/profile.md and DIR/profile.png:
- per function (scale_s, next_s, decode, …): median, min and max milliseconds over the N images;
- per kernel (run here only: TVM's RPC cannot call back into this process): milliseconds per
  image summed over the calls of each compiled kernel, through `vm.set_instrument`;
- memory: weights, KV caches, and (run here) the process's resident high-water mark;
- roofline of the transformer part (targets/*.toml `peak_gflops`, `bandwidth_gbs`): the least
  time its multiply-adds and weight reads could take on the board, and the gap to it.
If the board goes away mid-run, the images finished so far are written and the error says so.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import targets
from device.artifact import load_manifest
from device.errors import UserError, cli
from device.fileio import atomic_path, ensure_writable_dir
from device.runtime import CompiledVAR
from device.sampling import make_rng


# the artifact's arrays of the layers every scale runs on every token: each block's dense
# layers and the head (their weights, scales and biases, as the build stores them)
PER_TOKEN_LAYERS = re.compile(r"var\.(blocks\.\d+\.(attn\.mat_qkv|attn\.proj|ffn\.fc1|ffn\.fc2)|head)\.")


def transformer_work(model: dict, batch: int, param_bytes: dict) -> tuple[float, float]:
    """(multiply-adds, weight bytes read) of the per-scale transformer for one batch: dense layers
    of every block and the head on every token, attention against all earlier tokens (dense).
    `param_bytes`: the artifact's arrays, name → bytes as stored (a plan's int8, int4 and float16
    weights at their own size); the dense layers' arrays are read once per scale."""
    C, D, V = model["width"], model["depth"], model["vocab_size"]
    hidden = model["var"].get("mlp_hidden") or 4 * C
    NB = 2 * batch
    per_token = D * (C * 3 * C + C * C + 2 * C * hidden) + C * V
    macs, seen = 0.0, 0
    for pn in model["patch_nums"]:
        n = pn * pn
        seen += n
        macs += NB * n * per_token + D * NB * n * seen * C * 2      # q·k and p·v
    per_scale = sum(b for name, b in param_bytes.items() if PER_TOKEN_LAYERS.match(name))
    return macs, float(per_scale * len(model["patch_nums"]))


def instrumented_kernels(model: CompiledVAR, labels, sampler) -> dict:
    """Milliseconds per compiled kernel for one generation (local runs only)."""
    from tvm.runtime.vm import VMInstrumentReturnKind
    times, start = {}, {}

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            start[name] = time.perf_counter()
        else:
            model.dev.sync()
            times[name] = times.get(name, 0.0) + time.perf_counter() - start.pop(name)
        return VMInstrumentReturnKind.NO_OP

    model.vm.set_instrument(instrument)
    try:
        model.generate(labels, rng=make_rng(0), **sampler)
    finally:
        model.vm.set_instrument(None)
    return {k: 1e3 * v for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def kernel_families(kernels_ms: dict) -> dict:
    """attention0, attention1, … → attention: one entry per kernel family (shapes differ per scale)."""
    fam = {}
    for name, ms in kernels_ms.items():
        key = name.rstrip("0123456789") or name
        fam[key] = fam.get(key, 0.0) + ms
    return dict(sorted(fam.items(), key=lambda kv: -kv[1]))


def profile(model: CompiledVAR, labels, n: int, sampler: dict, board, log=print) -> dict:
    man = model.manifest
    res = {"artifact_target": man["target"], "board": board.name, "device": man.get("device", "cpu"),
           "remote": model.remote, "batch": len(labels), "images": 0, "functions_ms": {}, "error": None}
    per_fn = {}
    try:
        model.generate(labels, rng=make_rng(99), **sampler)                   # warm-up
        for k in range(n):
            model.timings = {}
            t0 = time.perf_counter()
            model.generate(labels, rng=make_rng(k), **sampler)
            total = time.perf_counter() - t0
            for name, ts in model.timings.items():
                per_fn.setdefault(name, []).append(1e3 * sum(ts))
            per_fn.setdefault("total", []).append(1e3 * total)
            res["images"] = k + 1
            log(f"image {k + 1}/{n}: {total:.3f} s")
    except Exception as e:  # noqa: BLE001  (a lost board: keep what was measured)
        res["error"] = str(e).strip().splitlines()[-1][:300] or type(e).__name__
    finally:
        model.timings = None
    res["functions_ms"] = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                           for name, v in per_fn.items()}
    if res["error"] is None and not model.remote:
        res["kernels_ms"] = instrumented_kernels(model, labels, sampler)
        res["kernel_families_ms"] = kernel_families(res["kernels_ms"])
    param_bytes = {name: int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                   for name, p in zip(man["param_names"], model.params)}
    params_mb = sum(param_bytes.values()) / 2**20
    kv_mb = sum(np.prod(k.shape) * 4 for k in model.kv) / 2**20
    res["memory_mb"] = {"weights": params_mb, "kv_cache": kv_mb}
    if not model.remote:
        from host.bench import vm_hwm_mb
        res["memory_mb"]["process_peak_rss"] = vm_hwm_mb()
    macs, wbytes = transformer_work(man["model"], model.batch, param_bytes)
    roof = board.roofline
    if roof.get("peak_gflops") and roof.get("bandwidth_gbs") and "total" in res["functions_ms"]:
        bound_s = max(2 * macs / (roof["peak_gflops"] * 1e9), wbytes / (roof["bandwidth_gbs"] * 1e9))
        measured = sum(v["median"] for k, v in res["functions_ms"].items() if k.startswith("scale_")) / 1e3
        res["roofline"] = {"transformer_gmacs": macs / 1e9, "weight_reads_mb": wbytes / 2**20,
                           "peak_gflops": roof["peak_gflops"], "bandwidth_gbs": roof["bandwidth_gbs"],
                           "bound_ms": 1e3 * bound_s, "measured_ms": 1e3 * measured,
                           "gap": measured / bound_s}
    return res


def write_report(res: dict, out: Path) -> None:
    ensure_writable_dir(out)
    with atomic_path(out / "profile.json") as tmp:
        tmp.write_text(json.dumps(res, indent=2))
    fns = res["functions_ms"]
    lines = [f"# Profile: {res['artifact_target']} on {res['board']} ({res['device']}"
             f"{', over RPC' if res['remote'] else ''})", "",
             f"{res['images']} images, batch {res['batch']}" + (f"; stopped early: {res['error']}" if res["error"] else ""),
             "", "| function | median ms | min | max |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |" for k, v in fns.items()]
    if res.get("kernels_ms"):
        lines += ["", "Per kernel family, one image (`vm.set_instrument`; includes the instrument's own overhead):",
                  "", "| kernel family | ms |", "| --- | --- |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in list(res["kernel_families_ms"].items())[:20]]
    lines += ["", "Memory (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in res["memory_mb"].items() if v is not None)]
    if res.get("roofline"):
        r = res["roofline"]
        lines += [f"Roofline of the transformer: {r['transformer_gmacs']:.2f} GMAC, {r['weight_reads_mb']:.0f} MB of "
                  f"weight reads; bound {r['bound_ms']:.2f} ms, measured {r['measured_ms']:.2f} ms "
                  f"({r['gap']:.1f}× the bound)"]
    with atomic_path(out / "profile.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    scales = [k for k in fns if k.startswith("scale_")]
    if scales:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        med = [fns[k]["median"] for k in scales]
        err = [[m - fns[k]["min"] for k, m in zip(scales, med)], [fns[k]["max"] - m for k, m in zip(scales, med)]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(scales)), med, yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(scales)), [k.split("_")[1] for k in scales])
        ax.set_xlabel("scale")
        ax.set_ylabel("ms (median, min–max)")
        ax.set_title(f"{res['artifact_target']} on {res['board']}: latency per scale")
        fig.tight_layout()
        with atomic_path(out / "profile.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)


@cli
def main(argv=None):
    from host.deploy import add_ssh_args, ssh_board
    ap = argparse.ArgumentParser(prog="python -m host.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--rpc", help="HOST:PORT of the board's rpc_server (default: run here)")
    ap.add_argument("--tracker", help="HOST:PORT of an RPC tracker")
    ap.add_argument("--key", help="tracker key (default: the artifact target's rpc_key)")
    ap.add_argument("--ssh", help="USER@HOST[:PORT]: start the board's rpc_server over SSH")
    add_ssh_args(ap)
    ap.add_argument("-n", type=int, default=5, help="timed generations (default 5)")
    ap.add_argument("--class", dest="cls", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a connection wait may take")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.n < 1:
        raise UserError("-n must be at least 1")
    if sum(bool(x) for x in (args.rpc, args.tracker, args.ssh)) > 1:
        raise UserError("give one of --rpc, --tracker and --ssh")
    manifest = load_manifest(args.artifact)
    board = targets.load(manifest["target"])
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    with ssh_board(args):
        run(args, manifest, board, log)


def run(args, manifest, board, log):
    from host.deploy import connect
    if args.rpc or args.tracker:
        model = CompiledVAR(args.artifact, session=connect(args, manifest))
    else:
        model = CompiledVAR(args.artifact)
    if not 0 <= args.cls < model.num_classes:
        raise UserError(f"--class {args.cls}: the model has classes 0..{model.num_classes - 1}")
    sampler = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
    res = profile(model, [args.cls] * model.batch, args.n, sampler, board, log)
    write_report(res, args.out)
    print((args.out / "profile.md").read_text())
    if res["error"]:
        raise UserError(f"the board failed after {res['images']} of {args.n} images ({res['error']}); "
                        f"the finished measurements are in {args.out}")


if __name__ == "__main__":
    main()
