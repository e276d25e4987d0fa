"""Official-format checkpoints with random values, built from the key manifest of the official
files (every key, shape and dtype): what the tests and `host.bench --model d16` use, since the
real weights cannot be downloaded here. FLOPs, bytes and timings are those of the real model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from compiler.errors import UserError

OFFICIAL_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dict_keys.json"
PATCH_NUMS = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def _entries(manifest, name: str) -> dict:
    path = Path(manifest)
    if not path.is_file():
        raise UserError(f"{path}: key manifest of the official checkpoints not found")
    entries = json.loads(path.read_text())
    if name not in entries:
        raise UserError(f"{path}: no checkpoint '{name}' (has: {', '.join(entries)})")
    return entries[name]


def random_official_state_dict(name: str, depth: int | None = None, seed: int = 0,
                               manifest=OFFICIAL_MANIFEST) -> dict:
    """Random values with every key, shape and dtype of the official checkpoint `name`.

    Buffers get their real values (the model reads patch_nums off `lvl_1L`); with `depth`, only
    the first `depth` blocks are kept (a reduced-depth model of the same family)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in _entries(manifest, name).items():
        if depth is not None and key.startswith("blocks.") and int(key.split(".")[1]) >= depth:
            continue
        if key == "lvl_1L":
            pns = PATCH_NUMS[shape[1]]
            sd[key] = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(pns)]).view(1, -1)
        elif key == "attn_bias_for_masking":
            lvl = sd["lvl_1L"].view(-1)
            sd[key] = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf).view(shape)
        elif key.endswith("zero_k_bias") or key.endswith("ema_vocab_hit_SV"):
            sd[key] = torch.zeros(shape)
        elif key.endswith("scale_mul_1H11"):
            sd[key] = torch.full(shape, math.log(4.0))
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else 64
            sd[key] = torch.randn(shape, generator=g) * (0.5 / math.sqrt(fan_in))
        assert str(sd[key].dtype) == f"torch.{dtype}", key
    return sd


def load_reference(model: str, depth: int | None = None):
    """The demo model, or an official-format d16 with seeded random values (optionally cut to
    `depth` blocks); the same call gives the same weights, so a later build can be compared."""
    from compiler.checkpoint import build_var, build_vqvae, load_models
    if model == "demo":
        return load_models()
    var = build_var(random_official_state_dict("var_d16", depth), "var_d16 (random values)")
    vae = build_vqvae(random_official_state_dict("vae_ch160v4096z32"), var.cfg.patch_nums, "vae (random values)")
    return var, vae
