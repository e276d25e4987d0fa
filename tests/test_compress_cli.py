"""The compression commands end to end on a tiny model (and the demo model for its judge)."""
from __future__ import annotations

import json

import numpy as np
import torch

from compiler.compress.plan import load_plan
from compiler.model.config import VARConfig
from tests.conftest import TINY_VAR, run_cli, tiny_models


def test_calibrate_writes_a_plan_deterministically(tiny_ckpts, tmp_path):
    args = ["compiler.calibrate", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--samples", 6, "--top-k", 20,
            "--dense-scales", 1, "--quant", "w8a8"]
    r1 = run_cli(*args, "--out", tmp_path / "a" / "plan.json")
    r2 = run_cli(*args, "--out", tmp_path / "b" / "plan.json")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "calibrating" in r1.stderr and "attention multiply-adds removed" in r1.stdout
    a, b = (np.load(tmp_path / d / "plan.stats.npz") for d in "ab")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
    plan = load_plan(tmp_path / "a" / "plan.json")
    assert plan.windows is not None and plan.asc_share is not None
    assert plan.quant_layers["blocks.0.attn.mat_qkv"] == {"scheme": "w8a8"}
    assert plan.quant_layers["blocks.0.ffn.fc2"]["scheme"] == "fp16"  # protected: 16 bit by default, as in LiteVAR
    # reusing the statistics gives the same plan without sampling
    r3 = run_cli(*args, "--stats", tmp_path / "a" / "plan.stats.npz", "--out", tmp_path / "c.json")
    assert r3.returncode == 0 and "calibrating" not in r3.stderr
    again = load_plan(tmp_path / "c.json")
    assert again.windows == plan.windows
    assert again.calibration["stats"] == "a/plan.stats.npz"  # relative to the plan, so plans can move
    # threshold 0 shares attention across the CFG halves in every block and scale
    r4 = run_cli(*args, "--stats", tmp_path / "a" / "plan.stats.npz", "--asc-threshold", 0, "--out", tmp_path / "d.json")
    assert r4.returncode == 0, r4.stderr
    assert all(all(row) for row in load_plan(tmp_path / "d.json").asc_share)


def test_calibrate_rejects_bad_options(tiny_ckpts, tmp_path):
    base = ["compiler.calibrate", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--samples", 2, "--out", tmp_path / "p.json"]
    for extra, needle in ((["--quant", "w3a3"], "--quant 'w3a3'"), (["--quant", "w4a16:48"], "group"),
                          (["--protect", "ffn.fc2"], "TYPE=SCHEME"), (["--mdwa-threshold", "1.5"], "--mdwa-threshold")):
        r = run_cli(*base, *extra)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "p.json").exists()


def test_evaluate_report(tiny_ckpts, tmp_path):
    r = run_cli("compiler.calibrate", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--samples", 4, "--top-k", 20,
                "--dense-scales", 1, "--out", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    r = run_cli("compiler.evaluate", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--plan", tmp_path / "plan.json",
                "--samples", 4, "--greedy-samples", 2, "--top-k", 20, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    for k in ("attention_flops_saved", "weight_bytes_vs_fp16", "token_agreement", "logit_kl", "psnr_db"):
        assert isinstance(rep[k], float), k
    assert 0 <= rep["token_agreement"] <= 1 and rep["logit_kl"] >= 0
    kept = rep["mdwa_kept_pairs"]
    assert len(kept["per_scale"]) == 4 and 0 < kept["overall"] <= 1
    for png in ("samples_side_by_side.png", "attention_maps.png", "cond_uncond_similarity.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 1000
    assert (tmp_path / "ev" / "report.md").read_text().startswith("# Compression report")


def test_evaluate_refuses_a_plan_for_another_depth(tiny_ckpts, tmp_path):
    r = run_cli("compiler.calibrate", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--samples", 2, "--top-k", 20,
                "--out", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    deeper = VARConfig(**{**TINY_VAR.to_dict(), "depth": 3})
    var, _ = tiny_models(var_cfg=deeper)
    torch.save(var.state_dict(), tmp_path / "deeper.pth")
    r = run_cli("compiler.evaluate", "--var", tmp_path / "deeper.pth", "--vae", tiny_ckpts[1],
                "--plan", tmp_path / "plan.json", "--out", tmp_path / "ev")
    assert r.returncode == 2 and "plan.json: model.depth: the plan was made for depth = 2, this model has 3" in r.stderr


def test_sensitivity_sweep(tiny_ckpts, tmp_path):
    r = run_cli("compiler.sensitivity", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--samples", 2,
                "--greedy-samples", 1, "--top-k", 20, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert set(rep["per_type"]) == {"ada_lin", "attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2", "head", "head_nm.ada_lin"}
    assert (tmp_path / "s" / "sensitivity.png").exists()
