"""Compare a compressed model with the reference on the same seeds.

    python -m compiler.evaluate [--var VAR --vae VAE] --plan plan.json --out DIR [--samples 200]

Writes DIR/report.json, DIR/report.md and plots: sample grids side by side, and (when the
plan's calibration statistics are next to it) attention maps with the kept bands and the
similarity of the CFG halves. report.json holds, each as {"reference": x, "compressed": y}
where both sides exist: attention_flops_saved, weight_bytes_vs_fp16, token_agreement,
logit_kl, psnr_db, and for the demo model class_consistency and digits_fid.

FID and Inception Score (for official checkpoints; nothing is downloaded) need two files:
`--inception-weights` torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` and
`--fid-ref` an .npz with the reference statistics `mu` (2048,) and `sigma` (2048, 2048), e.g.
ADM's `VIRTUAL_imagenet256_labeled.npz`. With both, report.json gains fid and inception_score
of the --samples sampled images of each model (compiler/compress/inception_metrics.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args, add_sampler_args
from compiler.compress import plots
from compiler.compress.apply import apply_plan, attention_macs, kept_pair_fractions, linear_macs, weight_bytes
from compiler.compress.calibration import CalibrationStats, spread_labels
from compiler.compress.fidelity import generate_batched, greedy_fidelity, greedy_run, psnr_db
from compiler.compress.inception_metrics import InceptionMetrics
from compiler.compress.plan import load_plan
from compiler.errors import UserError, cli
from compiler.fileio import atomic_path, ensure_writable_dir
from device.output import to_uint8


def cost_report(var, plan) -> dict:
    dense, planned = attention_macs(var.cfg, plan)
    fp16, q = weight_bytes(var, plan)
    lin = linear_macs(var.cfg)
    per_scale, overall = kept_pair_fractions(var.cfg, plan)
    return {"attention_flops_saved": 1 - planned / dense, "attention_macs_per_image": {"reference": dense, "compressed": planned},
            "attention_share_of_transformer_macs": {"reference": dense / (dense + lin), "compressed": planned / (planned + lin)},
            "weight_bytes_vs_fp16": q / fp16, "weight_bytes": {"fp16": fp16, "compressed": q},
            "mdwa_kept_pairs": {"per_scale": per_scale, "overall": overall}}


def fidelity_report(var, vae, comp, labels, greedy_labels, args, bar) -> tuple[dict, tuple]:
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    t_ref, i_ref = generate_batched(var, vae, labels, batch=args.batch, seed=args.seed, progress=bar.update, **sampling)
    t_cmp, i_cmp = generate_batched(comp, vae, labels, batch=args.batch, seed=args.seed, progress=bar.update, **sampling)
    reference = greedy_run(var, vae, greedy_labels, cfg=args.cfg, batch=args.batch)
    bar.update(len(greedy_labels))
    rep = greedy_fidelity(reference, comp, vae, greedy_labels, cfg=args.cfg, batch=args.batch)
    bar.update(2 * len(greedy_labels))
    rep.update(psnr_db=psnr_db(i_ref, i_cmp), sampled_token_agreement=float((t_ref == t_cmp).double().mean()))
    return rep, (i_ref, i_cmp)


def inception_metrics(args) -> InceptionMetrics | None:
    """The Inception network and FID statistics when both files are given (checked before sampling)."""
    given = {"--inception-weights": args.inception_weights, "--fid-ref": args.fid_ref}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        other = next(k for k in given if k not in missing)
        raise UserError(f"{other} needs {missing[0]} too: FID and Inception Score need both files (nothing is downloaded)")
    if args.costs_only:
        raise UserError("--inception-weights and --fid-ref score sampled images; they do not go with --costs-only")
    return InceptionMetrics(args.inception_weights, args.fid_ref)


def inception_report(metrics: InceptionMetrics, i_ref, i_cmp, batch) -> dict:
    """fid and inception_score of both models' sampled images (B×3×H×W in [0, 1])."""
    u8 = [torch.from_numpy(to_uint8(i.numpy())).permute(0, 3, 1, 2).contiguous() for i in (i_ref, i_cmp)]
    with tqdm(total=sum(len(x) for x in u8), desc="inception", unit="img") as bar:
        r, c = (metrics(x, batch=batch, progress=bar.update) for x in u8)
    return {"fid": {"reference": r["fid"], "compressed": c["fid"]},
            "inception_score": {"reference": r["inception_score"], "compressed": c["inception_score"]},
            "inception_score_splits": r["inception_score_splits"]}


def markdown(report: dict) -> str:
    lines = ["# Compression report", "", f"Plan: `{report['plan']}`; model: depth {report['model']['depth']}, "
             f"width {report['model']['width']}; {report['samples']} sampled images, {report['greedy_samples']} greedy.",
             "", "| metric | reference | compressed |", "| --- | --- | --- |"]
    for k, v in report.items():
        if isinstance(v, dict) and "compressed" in v and "reference" in v:
            lines.append(f"| {k} | {_fmt(v['reference'])} | {_fmt(v['compressed'])} |")
        elif isinstance(v, float):
            lines.append(f"| {k} | | {_fmt(v)} |")
    lines += ["", "![samples](samples_side_by_side.png)"]
    for name in ("attention_maps.png", "cond_uncond_similarity.png"):
        if name in report.get("plots", []):
            lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


def _fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.evaluate", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=200, help="sampled images per model, classes spread (default 200)")
    ap.add_argument("--greedy-samples", type=int, default=50, help="greedy images for token agreement and KL")
    add_sampler_args(ap)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--costs-only", action="store_true", help="only FLOPs and bytes (for random-valued checkpoints)")
    ap.add_argument("--inception-weights", type=Path, metavar="PTH",
                    help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth: FID and Inception Score "
                         "(with --fid-ref)")
    ap.add_argument("--fid-ref", type=Path, metavar="NPZ",
                    help="FID reference statistics: an .npz with mu (2048,) and sigma (2048, 2048), e.g. "
                         "VIRTUAL_imagenet256_labeled.npz (with --inception-weights)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    inception = inception_metrics(args)
    out = ensure_writable_dir(args.out)
    var, vae = load_models(args.var, args.vae)
    plan = load_plan(args.plan, var.cfg)
    report = {"plan": str(args.plan), "model": var.cfg.to_dict(), "samples": 0, "greedy_samples": 0,
              **cost_report(var, plan)}
    report["plots"] = []
    if not args.costs_only:
        if args.samples < 2 or args.greedy_samples < 1:
            raise UserError("--samples must be at least 2 and --greedy-samples at least 1")
        comp = apply_plan(var, plan)
        labels = spread_labels(args.samples, var.num_classes)
        greedy_labels = spread_labels(args.greedy_samples, var.num_classes)
        t0 = time.perf_counter()
        with tqdm(total=2 * len(labels) + 3 * len(greedy_labels), desc="evaluating", unit="img") as bar:
            fid, (i_ref, i_cmp) = fidelity_report(var, vae, comp, labels, greedy_labels, args, bar)
        report.update(fid, samples=len(labels), greedy_samples=len(greedy_labels),
                      seconds=round(time.perf_counter() - t0, 1))
        if inception is not None:
            report.update(inception_report(inception, i_ref, i_cmp, args.batch))
        if args.var is None:  # the demo model has a judge
            from compiler.digits import judge_samples, load_judge

            judge = load_judge()
            r, c = judge_samples(judge, i_ref, labels), judge_samples(judge, i_cmp, labels)
            for k in r:
                report[k] = {"reference": r[k], "compressed": c[k]}
        by_class = {}
        for i, lab in enumerate(labels):
            by_class.setdefault(lab, []).append(i)
        classes = sorted(by_class)[:10]
        rows = min(4, min(len(by_class[c]) for c in classes))
        show = [by_class[c][r] for r in range(rows) for c in classes]  # a column per class
        plots.side_by_side(to_uint8(i_ref[show].numpy()), to_uint8(i_cmp[show].numpy()), len(classes),
                           out / "samples_side_by_side.png")
        report["plots"].append("samples_side_by_side.png")
    stats_path = args.plan.parent / plan.calibration.get("stats", "-")
    if stats_path.is_file():
        stats = CalibrationStats.load(stats_path)
        plots.attention_maps(stats, var.cfg.patch_nums, out / "attention_maps.png", plan.windows)
        plots.cond_uncond_similarity(stats, out / "cond_uncond_similarity.png", plan.asc_share)
        report["plots"] += ["attention_maps.png", "cond_uncond_similarity.png"]
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
