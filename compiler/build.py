"""Compile a VAR checkpoint (optionally with a compression plan) into a board artifact.

    python -m compiler.build --target host [--var VAR --vae VAE] [--plan plan.json] [--batch 1] --out DIR

DIR holds model.so (the TVM library: embed, scale_0…scale_9, next_0…next_8, last, decode),
params.npz (the weights in the packed form the kernels read) and manifest.json (schema, model
config, plan, target, TVM version, batch, sha256 of every file). The artifact is written to a
temporary directory next to DIR and renamed at the end, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args
from compiler.compress.apply import apply_plan
from compiler.compress.plan import load_plan
from compiler.errors import UserError, cli
from compiler.fileio import ensure_writable_dir
from device.artifact import write_manifest
from device.runtime import SCHEMA, VERSION

COMPILED_SCHEMES = ("fp32", "w8a8")


def check_compilable(plan, where):
    """Refuse plan features that have no compiled kernel yet (instead of silently ignoring them)."""
    if plan.attention_bits:
        raise UserError(f"{where}: quant.attention_bits={plan.attention_bits}: 8-bit attention has no compiled kernel yet")
    for name, entry in plan.quant_layers.items():
        if entry["scheme"] not in COMPILED_SCHEMES:
            raise UserError(f"{where}: quant.layers.{name}: scheme {entry['scheme']} has no compiled kernel yet "
                            f"(compiled: {', '.join(COMPILED_SCHEMES)})")
    if plan.quant_default not in COMPILED_SCHEMES:
        raise UserError(f"{where}: quant.default: scheme {plan.quant_default} has no compiled kernel yet")


def lower(var, vae, plan, batch: int):
    """Reference models (+ plan) → (IRModule, ordered parameter arrays)."""
    from compiler.lower.module import GenerationModule
    from compiler.lower.params import param_arrays
    model = apply_plan(var, plan) if plan is not None else var
    gm = GenerationModule(model, vae, plan)
    mod, named = gm.export_tvm(spec=gm.spec(batch))
    return mod, param_arrays(named)


def compile_module(mod, target_dict):
    import tvm
    from tvm import relax
    target = tvm.target.Target(target_dict)
    # the default pipeline fuses; tvm.compile's own default does not (docs/tvm-0.27-findings.md)
    return tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))


def model_manifest(var, vae) -> dict:
    c = var.cfg
    return {"depth": c.depth, "width": c.width, "heads": c.heads, "patch_nums": list(c.patch_nums),
            "vocab_size": c.vocab_size, "num_classes": c.num_classes, "seq_len": c.seq_len, "cvae": c.cvae,
            "shared_aln": c.shared_aln, "image_size": vae.image_size, "var": c.to_dict(), "vqvae": vae.cfg.to_dict()}


def build(var, vae, plan, target_name: str, batch: int, out, *, plan_path=None, log=print):
    """Build an artifact into `out` (replacing an older artifact there only when done)."""
    import tvm
    from targets import resolve
    target_dict = resolve(target_name)
    out = Path(out)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    ensure_writable_dir(out.parent)
    t0 = time.perf_counter()
    log(f"[1/3] lowering to Relax (batch {batch}, {len(var.cfg.patch_nums)} scales)")
    mod, params = lower(var, vae, plan, batch)
    log(f"[2/3] compiling for {target_name}: {json.dumps(target_dict)} ({time.perf_counter() - t0:.0f} s)")
    ex = compile_module(mod, target_dict)
    log(f"[3/3] writing the artifact ({time.perf_counter() - t0:.0f} s)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ex.export_library(str(tmp / "model.so"))
        with open(tmp / "params.npz", "wb") as f:
            np.savez(f, **params)
        manifest = {
            "schema": SCHEMA, "version": VERSION, "target": target_name, "tvm_target": target_dict,
            "tvm_version": tvm.__version__, "batch": batch, "model": model_manifest(var, vae),
            "plan": plan.to_json() if plan is not None else None,
            "plan_name": str(plan_path) if plan_path else None,
            "library": "model.so", "params": "params.npz", "param_names": list(params),
        }
        write_manifest(tmp, manifest)
        if out.exists():
            if not (out / "manifest.json").is_file():
                raise UserError(f"{out}: exists and is not an artifact; not overwriting it")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"built {out} in {time.perf_counter() - t0:.0f} s")
    return out


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="host", help="board to compile for (default: host)")
    add_model_args(ap)
    ap.add_argument("--plan", help="compression plan from python -m compiler.calibrate (default: dense fp32)")
    ap.add_argument("--batch", type=int, default=1, help="images per generation call (default 1)")
    ap.add_argument("--out", required=True, help="artifact directory to write")
    args = ap.parse_args(argv)
    from targets import resolve
    resolve(args.target)  # unknown target: fail before loading anything
    var, vae = load_models(args.var, args.vae)
    plan = None
    if args.plan:
        plan = load_plan(args.plan, var.cfg)
        check_compilable(plan, args.plan)
    build(var, vae, plan, args.target, args.batch, args.out, plan_path=args.plan,
          log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
