"""PyTorch eager on a CUDA GPU against compiled CUDA artifacts, side by side in one process.

    python -m host.bench_gpu [--var V --vae E | --model d16] --artifact DIR [--artifact DIR …] \\
                             [-n 10] [--out bench-gpu.json]

Per image: batch 1, CFG 4, greedy (top-k 1, so no sampler in the timing), decoder included.
PyTorch runs the reference model (compiler/model) in fp32 with cuDNN's TF32 convolutions off,
as every artifact computes in fp32; each artifact runs through device.runtime. The engines take
turns image by image (host.bench.timed_images, without its pauses: no engine leaves CPU
threads spinning), so each ratio is also given round by round.
Also reported: each artifact's first image against PyTorch's (class 0: the greatest pixel
difference, about 1e-6 for a dense build of the same checkpoint, whose greedy tokens are the
same), the GPU memory each engine holds once loaded and after one image, and PyTorch's
decoder alone with TF32 on (its default) and off. Needs PyTorch with CUDA, and the TVM runtime
with CUDA, on the GPU machine. Without a GPU everything runs on this CPU (host artifacts).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compiler.cliargs import add_model_args
from device.errors import UserError, cli
from device.fileio import atomic_path, ensure_writable_dir
from host.bench import round_speedups, timed_images


def greedy_f_hat(var, vae, c: int, dev):
    """f̂ of one greedy image of class c (CFG 4), computed on `dev` by the reference model."""
    import torch

    from compiler.sampler import autoregress
    with torch.no_grad(), torch.device(dev):
        return autoregress(var, vae, [c], lambda si, logits: logits.argmax(-1), cfg=4.0)[1]


def torch_engine(var, vae, dev):
    """A function generating one greedy image of class c on `dev`, synchronised."""
    import torch

    @torch.no_grad()
    def run(c, _seed=0):
        return vae.fhat_to_img(greedy_f_hat(var, vae, c, dev)).add_(1).mul_(0.5).cpu().numpy()
    return run


def artifact_engine(path: str, cfg):
    from device.runtime import CompiledVAR
    model = CompiledVAR(path)
    m = model.manifest["model"]
    if (m.get("depth"), m.get("width")) != (cfg.depth, cfg.width):
        raise UserError(f"{path}: built for depth {m.get('depth')}, width {m.get('width')}; the PyTorch "
                        f"model has depth {cfg.depth}, width {cfg.width} (pass its --var/--vae or --model)")
    return lambda c, _seed=0: model.generate([c], cfg=4.0, top_k=1, top_p=0.0)[1]


def decoder_ms(var, vae, dev, sync, repeats: int = 10) -> dict:
    """PyTorch's decoder alone on one f̂, ms (median), cuDNN's TF32 on and off."""
    import torch
    out = {}
    f_hat = greedy_f_hat(var, vae, 0, dev)
    with torch.no_grad():
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            ts = []
            for _ in range(repeats + 2):
                sync()
                t0 = time.perf_counter()
                vae.fhat_to_img(f_hat)
                sync()
                ts.append(time.perf_counter() - t0)
            out["tf32" if tf32 else "fp32"] = 1e3 * statistics.median(ts[2:])
    torch.backends.cudnn.allow_tf32 = False
    return out


def measure(var, vae, artifacts: list[str], images: int, log=print) -> dict:
    import torch
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    free0 = torch.cuda.mem_get_info()[0] if gpu else 0

    def held_mb():   # GPU memory in use since the start (all engines so far)
        sync()
        return (free0 - torch.cuda.mem_get_info()[0]) / 2**20 if gpu else 0.0

    torch.backends.cudnn.allow_tf32 = False
    var, vae = var.to(dev).eval(), vae.to(dev).eval()
    log(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name() if gpu else 'the CPU (no GPU)'}")
    engines, memory, diff = {"pytorch": torch_engine(var, vae, dev)}, {}, {}
    reference = engines["pytorch"](0)
    memory["pytorch"] = held_mb()
    for path in artifacts:
        name = Path(path).name
        if name in engines:
            raise UserError(f"--artifact {path}: two artifacts named {name}")
        before = held_mb()
        engines[name] = artifact_engine(path, var.cfg)
        diff[name] = float(abs(engines[name](0) - reference).max())   # same greedy tokens: ~1e-6
        memory[name] = held_mb() - before
    # each engine returns its image on the host, so every call ends synchronised
    times = timed_images(engines, images, var.cfg.num_classes, log, quiet_cores=False)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"device": torch.cuda.get_device_name() if gpu else "cpu", "images": images, "batch": 1, "cfg": 4.0,
            "top_k": 1, "median_ms": {n: 1e3 * t for n, t in med.items()},
            "speedup_vs_pytorch": {n: med["pytorch"] / t for n, t in med.items() if n != "pytorch"},
            "speedup_per_round": round_speedups(times), "gpu_memory_mb": memory,
            "image_max_diff_vs_pytorch": diff,
            "pytorch_decoder_ms": decoder_ms(var, vae, dev, sync), "all_s": times}


def report(res: dict, log=print) -> None:
    log(f"\n{res['device']}: ms per image, median of {res['images']} (greedy, CFG 4, batch 1, decoder included)")
    for name, ms in res["median_ms"].items():
        line = f"{name:16s} {ms:9.2f} ms  GPU memory {res['gpu_memory_mb'][name]:7.0f} MB"
        if name in res["speedup_vs_pytorch"]:
            r = res["speedup_per_round"][name]
            line += (f"  {res['speedup_vs_pytorch'][name]:.2f}x PyTorch (per round {r['min']:.2f}–{r['max']:.2f}x)"
                     f"  image max diff {res['image_max_diff_vs_pytorch'][name]:.1e}")
        log(line)
    d = res["pytorch_decoder_ms"]
    log(f"PyTorch's decoder alone: {d['fp32']:.2f} ms fp32, {d['tf32']:.2f} ms with TF32 convolutions")


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m host.bench_gpu", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--model", choices=("d16",), help="d16: the seeded official-format d16 with random values "
                    "(compiler.official, as host.bench --model d16) instead of --var/--vae")
    ap.add_argument("--artifact", action="append", required=True, help="a CUDA (or, without a GPU, host) build")
    ap.add_argument("-n", "--images", type=int, default=10, help="timed images per engine (default 10)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.images < 1:
        raise UserError(f"-n must be at least 1, got {args.images}")
    if args.out:
        ensure_writable_dir(args.out.parent)
    if args.model:
        from compiler.official import load_reference
        var, vae = load_reference(args.model)
    else:
        from compiler.checkpoint import load_models
        var, vae = load_models(args.var, args.vae)
    res = measure(var, vae, args.artifact, args.images)
    report(res)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
