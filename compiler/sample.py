"""Reference sampler CLI: the contract every compiled and board path is compared against.

    python -m compiler.sample [--var VAR --vae VAE] --class 3 7 --cfg 4 --top-k 900 --top-p 0.95 \\
        --seed 0 [-n 1] --out DIR

Writes DIR/NNN_classC.png per image, DIR/grid.png, and DIR/samples.npz with `tokens`
(B×L int64, scales coarse to fine), `images` (B×3×H×W float32 in [0, 1]) and `labels`.
`--top-k 1` is greedy. Without --var/--vae the bundled demo model is used.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args
from compiler.errors import cli
from compiler.fileio import ensure_writable_dir
from compiler.sampler import generate
from device.cliargs import add_sampling_args, labels_from_args
from device.output import save_samples


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.sample", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--batch", type=int, default=16, help="images generated at once (default 16)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    ensure_writable_dir(args.out)
    var, vae = load_models(args.var, args.vae)
    labels = labels_from_args(args, var.num_classes)
    t0 = time.perf_counter()
    toks, imgs = [], []
    S = len(var.cfg.patch_nums)
    chunks = [labels[i:i + args.batch] for i in range(0, len(labels), args.batch)]
    with tqdm(total=len(chunks) * S, desc="generating", unit="scale", mininterval=1) as bar:
        for k, chunk in enumerate(chunks):
            # Chunk k draws from seed + k: a run that fits in one batch is seeded exactly like
            # the official autoregressive_infer_cfg(g_seed=seed).
            t, im = generate(var, vae, chunk, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed + k, progress=lambda si: bar.update(1))
            toks.append(t.numpy())
            imgs.append(im.numpy())
    seconds = time.perf_counter() - t0
    meta = {"var": args.var or "demo", "vae": args.vae or "demo", "model": var.cfg.to_dict(),
            "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "batch": args.batch, "seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(labels), 3)}
    save_samples(args.out, labels, np.concatenate(toks), np.concatenate(imgs), meta, cols=len(args.classes))
    print(f"wrote {len(labels)} images to {args.out} ({seconds / len(labels):.2f} s/image)")


if __name__ == "__main__":
    main()
