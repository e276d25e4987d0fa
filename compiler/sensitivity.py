"""Which layer types must stay at higher precision? (the LiteVAR paper's Figure 5)

    python -m compiler.sensitivity [--var VAR --vae VAE] [--base w8a8] [--low w8a4] --samples 100 --out DIR

Puts one layer type at a time at the lower precision and every other linear layer at the base
precision, and measures how far generation moves from the reference model on the same seeds
(greedy token agreement, logit KL; class consistency and digits-FID for the demo model). A type
whose KL is more than `--factor` times the median of the others is reported as one to protect.
Writes DIR/sensitivity.json and DIR/sensitivity.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm import tqdm

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args, add_sampler_args
from compiler.compress import plots
from compiler.compress.apply import apply_plan
from compiler.compress.calibration import layer_type, spread_labels
from compiler.compress.fidelity import generate_batched, greedy_fidelity, greedy_run
from compiler.compress.plan import Plan, linear_layer_names
from compiler.compress.quant import SCHEMES
from compiler.errors import UserError, cli
from compiler.fileio import atomic_path, ensure_writable_dir


def quant_plan(cfg, base: str, low: str | None, low_type: str | None, group: int) -> Plan:
    plan = Plan.empty(cfg)
    for name in linear_layer_names(cfg):
        if name == "word_embed":
            continue
        scheme = low if layer_type(name) == low_type else base
        plan.quant_layers[name] = {"scheme": scheme, **({"group": group} if scheme.startswith("w4") else {})}
    return plan


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.sensitivity", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--base", default="w8a8", help="precision of every other layer (default w8a8)")
    ap.add_argument("--low", default="w8a4", help="precision of the layer type under test (default w8a4: 4-bit activations)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=100, help="sampled images per configuration")
    ap.add_argument("--greedy-samples", type=int, default=20)
    add_sampler_args(ap)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for opt in ("base", "low"):
        if getattr(args, opt) not in SCHEMES:
            raise UserError(f"--{opt} {getattr(args, opt)!r}: expected one of {tuple(SCHEMES)}")
    out = ensure_writable_dir(args.out)

    var, vae = load_models(args.var, args.vae)
    types = sorted({layer_type(n) for n in linear_layer_names(var.cfg) if n != "word_embed"})
    labels = spread_labels(args.samples, var.num_classes)
    greedy = spread_labels(args.greedy_samples, var.num_classes)
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    judge = None
    if args.var is None:
        from compiler.digits import judge_samples, load_judge
        judge = load_judge()

    configs = [("all " + args.base, None)] + [(t, t) for t in types]
    results = {}
    with tqdm(total=len(labels) * (len(configs) + 1), desc="sensitivity", unit="img") as bar:
        _, ref_imgs = generate_batched(var, vae, labels, batch=args.batch, seed=args.seed, progress=bar.update, **sampling)
        ref_scores = judge_samples(judge, ref_imgs, labels) if judge else {}
        reference = greedy_run(var, vae, greedy, cfg=args.cfg, batch=args.batch)  # once for all types
        for name, low_type in configs:
            comp = apply_plan(var, quant_plan(var.cfg, args.base, args.low, low_type, args.group))
            _, imgs = generate_batched(comp, vae, labels, batch=args.batch, seed=args.seed, progress=bar.update, **sampling)
            g = greedy_fidelity(reference, comp, vae, greedy, cfg=args.cfg, batch=args.batch)
            r = {"token_agreement": g["token_agreement"], "logit_kl": g["logit_kl"]}
            if judge:
                r.update(judge_samples(judge, imgs, labels))
            results[name] = r
            bar.set_postfix(type=name, kl=f"{r['logit_kl']:.4f}")
    base = results.pop("all " + args.base)
    kls = {t: r["logit_kl"] for t, r in results.items()}
    protect = [t for t, k in kls.items() if k > args.factor * statistics.median([v for u, v in kls.items() if u != t])]
    report = {"base": args.base, "low": args.low, "reference": ref_scores, "all_base": base, "per_type": results,
              "protect": protect, "samples": len(labels), "greedy_samples": len(greedy)}
    with atomic_path(out / "sensitivity.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    # KL is the decisive measure: digits-FID on ~100 samples moves by ±15 % from noise alone.
    plots.sensitivity_bars(results, "logit_kl", out / "sensitivity.png", baseline=base["logit_kl"],
                           title=f"one layer type at {args.low}, the rest at {args.base}")
    for t, r in results.items():
        print(f"{t:16s} " + "  ".join(f"{k}={v:.4f}" for k, v in r.items()))
    print(f"protect: {', '.join(protect) or '(none)'}")


if __name__ == "__main__":
    main()
