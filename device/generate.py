"""Generate images on the board from a compiled artifact (TVM runtime, numpy and Pillow only).

    python -m device.generate --artifact DIR --class 3 7 --seed 0 -n 4 --cfg 4 --top-k 900 \\
        --top-p 0.95 --out OUT

Same outputs as `python -m compiler.sample`: one PNG per image, grid.png, samples.npz (`tokens`,
`images`, `labels`) and meta.json. Sampling uses numpy's PCG64 seeded with --seed (chunk k with
seed + k), so sampled images differ from PyTorch's; `--top-k 1` (greedy) gives the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from device.cliargs import add_sampling_args, labels_from_args
from device.errors import cli
from device.fileio import ensure_writable_dir
from device.output import save_samples
from device.runtime import CompiledVAR
from device.sampling import make_rng


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m device.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, help="directory written by python -m compiler.build")
    add_sampling_args(ap)
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    ensure_writable_dir(args.out)
    model = CompiledVAR(args.artifact)
    labels = labels_from_args(args, model.num_classes)
    chunks = [labels[i:i + model.batch] for i in range(0, len(labels), model.batch)]
    S = len(model.patch_nums)
    toks, imgs, t0 = [], [], time.perf_counter()
    for k, chunk in enumerate(chunks):
        rng = make_rng(args.seed + k)
        t, im = model.generate(chunk, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, rng=rng,
                               on_scale=lambda si, k=k: _progress(k, len(chunks), si, S))
        toks.append(t)
        imgs.append(im)
    seconds = time.perf_counter() - t0
    print(file=sys.stderr)
    meta = {"artifact": str(args.artifact), "model": model.manifest["model"], "plan": model.manifest.get("plan_name"),
            "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "batch": model.batch,
            "seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(labels), 3)}
    save_samples(args.out, labels, np.concatenate(toks), np.concatenate(imgs), meta, cols=len(args.classes))
    print(f"wrote {len(labels)} images to {args.out} ({seconds / len(labels):.2f} s/image)")


def _progress(chunk, chunks, si, S):
    print(f"\rgenerating: batch {chunk + 1}/{chunks}, scale {si + 1}/{S}", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
