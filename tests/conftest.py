"""Shared fixtures: official-format state dicts built from the key manifest, and tiny models."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler.model.config import VARConfig, VQVAEConfig
from compiler.model.var import VAR
from compiler.model.vqvae import VQVAE

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT.parent / "shared" / "reference" / "official_state_dict_keys.json"
PATCH_NUMS = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def manifest(name: str) -> dict:
    if not MANIFEST.exists():
        pytest.skip(f"{MANIFEST} not found")
    return json.loads(MANIFEST.read_text())[name]


def official_state_dict(name: str, depth: int | None = None, seed: int = 0) -> dict:
    """Random values with every key, shape and dtype of the official checkpoint `name`.

    Buffers get their real values (the model reads patch_nums off `lvl_1L`); with `depth`, only
    the first `depth` blocks are kept (a reduced-depth model of the same family)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in manifest(name).items():
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


TINY_VAR = VARConfig(depth=2, width=64, heads=2, patch_nums=(1, 2, 3, 4), vocab_size=64, cvae=8,
                     num_classes=5, shared_aln=False, mlp_hidden=256)
TINY_VAE = VQVAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=64, in_channels=3,
                       using_sa=True, using_mid_sa=True, num_phi=4, num_scales=4)


def tiny_models(seed=0, var_cfg=TINY_VAR):
    torch.manual_seed(seed)
    var, vae = VAR(var_cfg), VQVAE(TINY_VAE, var_cfg.patch_nums)
    for b in var.blocks:  # make the residual branches matter (the official init gates them ~0)
        torch.nn.init.normal_(b.ada_lin[-1].weight, std=0.1)
    return var.eval(), vae.eval()


@pytest.fixture
def tiny_ckpts(tmp_path):
    """Paths of a tiny random VAR/VQVAE pair saved as .pth files."""
    var, vae = tiny_models()
    pv, pe = tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth"
    torch.save(var.state_dict(), pv)
    torch.save(vae.state_dict(), pe)
    return pv, pe


def run_cli(*args, timeout=600):
    """Run `python -m ...` as a user would; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
