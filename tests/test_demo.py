"""The bundled demo model: the sampler CLI contract, its size, reproducible training, quality."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from compiler.checkpoint import DEMO_DIR, load_models
from compiler.sampler import generate
from tests.conftest import run_cli


def test_demo_weights_are_small_and_in_official_format():
    files = [DEMO_DIR / n for n in ("var_demo.pth", "vae_demo.pth", "digit_judge.pth")]
    assert sum(f.stat().st_size for f in files) <= 20e6
    var, vae = load_models()
    assert var.cfg.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and var.cfg.seq_len == 680
    assert var.cfg.vocab_size >= 900  # the official top-k 900 is meaningful
    assert "attn_bias_for_masking" in var.state_dict() and "quantize.ema_vocab_hit_SV" in vae.state_dict()


def test_sample_cli_contract(tmp_path):
    out = tmp_path / "out"
    r = run_cli("compiler.sample", "--class", 3, 7, "-n", 2, "--cfg", 4, "--top-k", 900, "--top-p", 0.95,
                "--seed", 0, "--out", out)
    assert r.returncode == 0, r.stderr
    data = np.load(out / "samples.npz")
    tokens, images, labels = data["tokens"], data["images"], data["labels"]
    assert tokens.dtype == np.int64 and tokens.shape == (4, 680)
    assert images.dtype == np.float32 and images.shape == (4, 3, 32, 32)
    assert 0 <= images.min() and images.max() <= 1 and 0 <= tokens.min() and tokens.max() < 1024
    assert labels.tolist() == [3, 7, 3, 7]
    pngs = sorted(out.glob("0*_class*.png"))
    assert [p.name for p in pngs] == ["000_class3.png", "001_class7.png", "002_class3.png", "003_class7.png"]
    png = np.asarray(Image.open(pngs[1]))
    assert np.abs(png.astype(float) / 255 - images[1].transpose(1, 2, 0)).max() <= 0.5 / 255 + 1e-6
    assert (out / "grid.png").exists() and json.loads((out / "meta.json").read_text())["top_k"] == 900
    assert not list(out.glob(".*tmp*"))

    # the CLI is the library: same seed, same batch → same tokens
    var, vae = load_models()
    t, _ = generate(var, vae, [3, 7, 3, 7], cfg=4, top_k=900, top_p=0.95, seed=0)
    assert np.array_equal(t.numpy(), tokens)


def test_sample_cli_rejects_an_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("compiler.sample", "--class", 1, "--out", blocker / "sub")
    assert r.returncode == 2 and "cannot create output directory" in r.stderr and "Traceback" not in r.stderr


def test_judge_is_accurate_on_held_out_digits():
    from compiler.digits import load_judge, load_split, render

    x8, y = load_split("test")
    with torch.no_grad():
        acc = (load_judge()((render(x8) + 1) / 2).argmax(1) == y).float().mean().item()
    assert acc >= 0.95


def test_training_is_reproducible():
    from compiler.train_demo import train_var, train_vqvae

    torch.set_num_threads(2)
    a, _ = train_vqvae(steps=2, batch=4, seed=0, copies=1)
    b, _ = train_vqvae(steps=2, batch=4, seed=0, copies=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    va_, _ = train_var(a.requires_grad_(False), steps=2, batch=2, seed=0, copies=1)
    vb_, _ = train_var(b.requires_grad_(False), steps=2, batch=2, seed=0, copies=1)
    assert all(torch.equal(x, y) for x, y in zip(va_.state_dict().values(), vb_.state_dict().values()))


@pytest.mark.slow
def test_demo_class_consistency(tmp_path):
    """The quality bar: cfg 4, top-k 900, top-p 0.95, 10 classes × 20 samples → ≥ 80 %."""
    out = tmp_path / "q"
    r = run_cli("compiler.sample", "--class", *range(10), "-n", 20, "--batch", 50, "--out", out, timeout=1800)
    assert r.returncode == 0, r.stderr
    r = run_cli("compiler.digits", out / "samples.npz")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    print(scores)
    assert scores["class_consistency"] >= 0.80
