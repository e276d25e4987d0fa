"""Export the per-scale graphs of a VAR checkpoint to ONNX, for ONNX Runtime or TensorRT users.

    python -m compiler.export_onnx [--var VAR --vae VAE] [--batch 1] --out DIR

Same functions and static shapes as the compiled artifact (compiler/lower/module.py), from the
PyTorch reference through `torch.onnx.export(..., dynamo=True)`:
    embed.onnx     labels 2B int64                          → mods 2B×(6D+2)×C, x 2B×1×C
    scale_<s>.onnx x, mods, tw 2, k_cache, v_cache          → guided logits B×n×V, k, v
    next_<s>.onnx  idx B×n int64, f_hat                     → f_hat_next, x of scale s+1
    last.onnx      idx, f_hat                               → f_hat_next
    decode.onnx    f_hat                                    → images B×3×H×W in [0, 1]
mods are the AdaLN vectors of every block and of the head (VAR.modulations), computed once per
image as in the compiled artifact, so that both run the same graphs. The caches are
depth×2B×H×T×c holding the T tokens of the earlier scales (scale 0 has none); each scale
returns them extended by its own tokens. ONNX has no in-place update, so the caches are passed
in and out. The export is of the dense fp32 model: a plan's integer kernels are ours, not ONNX
operators.

Every scale graph uses all transformer weights, so each graph exported alone would hold its
own copy of them. Instead, every initializer of at least 1 KiB is moved into one shared file,
DIR/weights.bin, each distinct tensor once (same dtype, shape and bytes by sha256, whatever
its name in each graph), at 4096-byte-aligned offsets; the graphs refer to it as standard ONNX
external data (location weights.bin, offset, length), so ONNX Runtime or TensorRT load any
.onnx file alone from DIR. DIR/manifest.json lists every file with its sha256 and, under
"initializers", each graph's shared initializers as name → [offset, length, numpy dtype,
shape], which host/onnx_engine.py uses to give all its sessions one copy of the weights.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args
from compiler.errors import UserError, cli
from compiler.fileio import ensure_writable_dir
from compiler.model.var import KVCache
from device.artifact import write_manifest
from host.onnx_engine import ALIGN, SCHEMA, VERSION

# ALIGN, SCHEMA, VERSION: the format, defined by its torch-free reader (host/onnx_engine.py)
WEIGHTS = "weights.bin"
SHARE_MIN_BYTES = 1024  # smaller initializers (shapes, scalars, small biases) stay in their graph


class Embed(torch.nn.Module):
    def __init__(self, var):
        super().__init__()
        self.var = var

    def forward(self, labels):
        cond = self.var.class_emb(labels)
        return self.var.modulations(cond), self.var.first_input(cond)


class Scale(torch.nn.Module):
    """All blocks and the head of scale `si`, with the caches as explicit inputs and outputs."""

    def __init__(self, var, si: int):
        super().__init__()
        self.var, self.si = var, si

    def forward(self, x, mods, tw, k_cache=None, v_cache=None):
        caches = [KVCache() for _ in self.var.blocks]
        if k_cache is not None:
            for d, c in enumerate(caches):
                c.k, c.v = k_cache[d], v_cache[d]
        logits = self.var.forward_scale_modulated(x, mods, caches)
        B = logits.shape[0] // 2
        guided = tw[0] * logits[:B] - tw[1] * logits[B:]    # (1 + t)·cond − t·uncond
        return guided, torch.stack([c.k for c in caches]), torch.stack([c.v for c in caches])


class Next(torch.nn.Module):
    """The f̂ update after scale `si` and, unless it is the last, the input of scale si + 1."""

    def __init__(self, var, vae, si: int):
        super().__init__()
        self.var, self.vae, self.si = var, vae, si

    def forward(self, idx, f_hat):
        c, si = self.var.cfg, self.si
        B, pn = idx.shape[0], c.patch_nums[si]
        h = self.vae.quantize.embedding(idx).transpose(1, 2).reshape(B, c.cvae, pn, pn)
        f_hat, nxt = self.vae.quantize.next_input(si, f_hat, h)
        if si == len(c.patch_nums) - 1:
            return f_hat
        b, e = c.begin_ends[si + 1]
        x = self.var.word_embed(nxt.reshape(B, c.cvae, -1).transpose(1, 2)) + self.var.lvl_pos()[:, b:e]
        return f_hat, torch.cat((x, x))


class Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, f_hat):
        return self.vae.fhat_to_img(f_hat).add(1).mul(0.5)


def example_inputs(var, batch: int) -> dict:
    """name → (module, example inputs, input names, output names), in the order they run."""
    c, B = var.cfg, batch
    NB, H, hd = 2 * B, c.heads, c.width // c.heads
    mods = torch.zeros(NB, 6 * c.depth + 2, c.width)
    f_hat = torch.zeros(B, c.cvae, c.patch_nums[-1], c.patch_nums[-1])
    out = {"embed": (Embed(var), (torch.zeros(NB, dtype=torch.long),), ["labels"], ["mods", "x"])}
    S = len(c.patch_nums)
    for si, pn in enumerate(c.patch_nums):
        begin = c.begin_ends[si][0]
        x = torch.zeros(NB, pn * pn, c.width)
        tw = torch.tensor([1.0, 0.0])
        if si == 0:
            args, names = (x, mods, tw), ["x", "mods", "tw"]
        else:
            cache = torch.zeros(c.depth, NB, H, begin, hd)
            args, names = (x, mods, tw, cache, cache.clone()), ["x", "mods", "tw", "k_cache", "v_cache"]
        out[f"scale_{si}"] = (Scale(var, si), args, names, ["logits", "k", "v"])
        name = f"next_{si}" if si < S - 1 else "last"
        outs = ["f_hat_next", "x"] if si < S - 1 else ["f_hat_next"]
        out[name] = (None, (torch.zeros(B, pn * pn, dtype=torch.long), f_hat), ["idx", "f_hat"], outs)
    out["decode"] = (None, (f_hat,), ["f_hat"], ["images"])
    return out


class SharedWeights:
    """weights.bin being written: each distinct tensor once, at ALIGN-aligned offsets."""

    def __init__(self, path: Path):
        self.path, self.f, self.size = path, open(path, "wb"), 0
        self.at = {}   # (dtype str, shape, sha256) → (offset, length)

    def add(self, arr: np.ndarray) -> tuple[int, int]:
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        key = (arr.dtype.str, arr.shape, hashlib.sha256(data).hexdigest())
        if key not in self.at:
            offset = -(-self.size // ALIGN) * ALIGN
            self.f.seek(offset)
            self.f.write(data)
            self.size = offset + len(data)
            self.at[key] = (offset, len(data))
        return self.at[key]

    def externalize(self, onnx_path: Path) -> dict:
        """Move the graph's initializers of ≥ SHARE_MIN_BYTES into weights.bin and rewrite the
        .onnx file to refer to them; returns name → [offset, length, numpy dtype, shape]."""
        import onnx
        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data
        model = onnx.load(str(onnx_path))
        table = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise UserError(f"{onnx_path}: initializer {t.name} is already external data")
            arr = numpy_helper.to_array(t)
            if arr.nbytes < SHARE_MIN_BYTES or arr.dtype.kind not in "biuf":
                continue
            offset, length = self.add(arr)
            if not t.HasField("raw_data"):   # typed fields (float_data, …): set_external_data needs raw_data
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
            set_external_data(t, WEIGHTS, offset, length)
            t.ClearField("raw_data")
            table[t.name] = [offset, length, arr.dtype.newbyteorder("<").str, list(arr.shape)]
        onnx.save(model, str(onnx_path))
        return table

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.truncate(self.size)
        self.f.close()


def export(var, vae, batch: int, out, log=print):
    """Write DIR/*.onnx, DIR/weights.bin and DIR/manifest.json (built in a temporary directory,
    renamed at the end)."""
    out = Path(out)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    ensure_writable_dir(out.parent)
    if out.exists() and not (out / "manifest.json").is_file():
        raise UserError(f"{out}: exists and is not an ONNX export; not overwriting it")
    var, vae = var.eval(), vae.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)   # "torchvision is not installed" etc.
    graphs = example_inputs(var, batch)
    S = len(var.cfg.patch_nums)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        initializers = {}
        with SharedWeights(tmp / WEIGHTS) as shared:
            for k, (name, (module, args, in_names, out_names)) in enumerate(graphs.items()):
                if module is None:
                    si = S - 1 if name == "last" else int(name.split("_")[1]) if name.startswith("next_") else None
                    module = Decode(vae) if name == "decode" else Next(var, vae, si)
                log(f"[{k + 1}/{len(graphs)}] exporting {name} ({time.perf_counter() - t0:.0f} s)")
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    prog = torch.onnx.export(module, args, input_names=in_names, output_names=out_names,
                                             dynamo=True, external_data=False, verbose=False)
                prog.save(str(tmp / f"{name}.onnx"))
                del prog   # d16: ~1.2 GB of weights, loaded again by externalize
                initializers[name] = shared.externalize(tmp / f"{name}.onnx")
        c = var.cfg
        write_manifest(tmp, {"schema": SCHEMA, "version": VERSION, "batch": batch,
                             "torch_version": torch.__version__,
                             "model": {"depth": c.depth, "width": c.width, "heads": c.heads,
                                       "patch_nums": list(c.patch_nums), "vocab_size": c.vocab_size,
                                       "num_classes": c.num_classes, "cvae": c.cvae},
                             "graphs": list(graphs), "weights": WEIGHTS, "initializers": initializers})
        if out.exists():
            import shutil
            shutil.rmtree(out)
        tmp.rename(out)
        tmp.mkdir()  # TemporaryDirectory removes it again
    log(f"exported {out} in {time.perf_counter() - t0:.0f} s")
    return out


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.export_onnx", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=1, help="images per generation call (default 1)")
    ap.add_argument("--out", required=True, help="directory to write the .onnx files to")
    args = ap.parse_args(argv)
    var, vae = load_models(args.var, args.vae)
    export(var, vae, args.batch, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
