"""Shared fixtures: official-format state dicts built from the key manifest, and tiny models."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler.model.config import VARConfig, VQVAEConfig
from compiler.official import OFFICIAL_MANIFEST, random_official_state_dict
from compiler.model.var import VAR
from compiler.model.vqvae import VQVAE
from host.net import stop_group, wait_listening

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = OFFICIAL_MANIFEST


def official_state_dict(name: str, depth: int | None = None, seed: int = 0) -> dict:
    if not MANIFEST.exists():
        pytest.skip(f"{MANIFEST} not found")
    return random_official_state_dict(name, depth, seed, MANIFEST)


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


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """tiny_build(target): the dense batch-1 build of tiny_models() for `target`, made once per
    test session (per worker under pytest -n) and shared by the tests that only read it."""
    from compiler.build import build
    made = {}

    def get(target: str = "host") -> Path:
        if target not in made:
            var, vae = tiny_models()
            made[target] = build(var, vae, None, target, 1, tmp_path_factory.mktemp("tiny") / target,
                                 log=lambda s: None)
        return made[target]
    return get


def serve(*args, port, log=None):
    """Start a TVM RPC process (`tvm.exec.rpc_server` or `tvm.exec.rpc_tracker`, then its own
    options) on loopback and wait until it accepts connections; its output goes to `log` (a
    path) if given. host.net.stop_group ends it with its workers."""
    with open(log, "w") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
        p = subprocess.Popen([sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", str(port),
                              "--port-end", str(port + 1)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)   # killpg ends the server's workers too
    if not wait_listening(port, 60, p):
        stop_group(p)
        raise RuntimeError(f"{args[0]} did not start")
    return p


def run_cli(*args, timeout=600):
    """Run `python -m ...` as a user would; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
