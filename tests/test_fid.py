"""FID and Inception Score (compiler/compress/inception_metrics.py, compiler.evaluate options).

No real Inception weights or ImageNet statistics are available here: the end-to-end checks use
torch-fidelity's InceptionV3 with random weights saved in its file format, and reference
statistics made from the features of the same images."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from compiler.compress import inception_metrics as im
from compiler.compress.plan import Plan, linear_layer_names
from compiler.errors import UserError
from compiler.evaluate import main as evaluate_main
from tests.conftest import TINY_VAR, run_cli


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights (scaled so the 2048-d features neither
    vanish nor explode), saved as a plain state dict like weights-inception-2015-12-05-*.pth."""
    cls = im._extractor_class()
    module = __import__(cls.__module__, fromlist=["load_state_dict_from_url"])
    with pytest.MonkeyPatch.context() as mp:  # build it without weights: nothing may be downloaded
        mp.setattr(module, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(0)
        net = cls("random", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=8 / math.sqrt(m.in_features))
            torch.nn.init.normal_(m.bias, std=0.1)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def _images(n, seed=0):
    """n uint8 images, 3×16×16: coarse random colour blocks, so a random network tells them apart."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(blocks, size=(16, 16), mode="nearest") * 255).round().to(torch.uint8)


def _save_stats(path, mu, sigma, **extra):
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return path


# --- the formulas ------------------------------------------------------------------------------

def test_fid_formula_matches_hand_computation():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 5))
    feats = rng.normal(size=(4000, 5)) @ A + np.arange(5)
    mu, sigma = im.feature_stats(feats)
    assert np.allclose(mu, feats.mean(0)) and np.allclose(sigma, np.cov(feats.T))
    assert abs(im.fid_from_stats(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert im.fid_from_stats(mu, sigma, mu + delta, sigma) == pytest.approx(delta @ delta, rel=1e-7)
    # two different covariances: the textbook formula with scipy's matrix square root
    B = rng.normal(size=(5, 5))
    sigma_b = B @ B.T + np.eye(5)
    mu_b = rng.normal(size=5)
    covmean = scipy.linalg.sqrtm(sigma @ sigma_b).real
    hand = (mu - mu_b) @ (mu - mu_b) + np.trace(sigma) + np.trace(sigma_b) - 2 * np.trace(covmean)
    assert im.fid_from_stats(mu, sigma, mu_b, sigma_b) == pytest.approx(hand, rel=1e-8)
    # diagonal covariances: ‖Δμ‖² + Σ (√a − √b)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert im.fid_from_stats(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(
        3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-10)


def test_fid_of_a_singular_covariance_against_itself_is_zero():
    feats = np.random.default_rng(1).normal(size=(10, 64))  # rank 9 < 64, as for few images
    mu, sigma = im.feature_stats(feats)
    assert abs(im.fid_from_stats(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    assert abs(im.fid_against_stats(feats, mu, sigma)) < 1e-12 * np.trace(sigma)


@pytest.mark.parametrize("n", [10, 200])  # fewer samples than dimensions (the N×N path), and more
def test_fid_against_stats_equals_the_general_formula(n):
    rng = np.random.default_rng(n)
    feats = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 1.0
    ref = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3
    mu_b, sigma_b = im.feature_stats(ref)
    general = im.fid_from_stats(*im.feature_stats(feats), mu_b, sigma_b)
    assert im.fid_against_stats(feats, mu_b, sigma_b) == pytest.approx(general, rel=1e-6)


def test_inception_score_by_hand():
    k = 7
    onehot = 60.0 * np.eye(k)[np.arange(70) % k]  # confident, every class equally often
    assert im.inception_score(onehot, splits=1) == pytest.approx(k, rel=1e-6)
    assert im.inception_score(np.tile(np.arange(5.0), (30, 1))) == pytest.approx(1.0)  # all alike: 1
    assert [im.is_splits(n) for n in (2, 19, 20, 99, 100, 5000)] == [1, 1, 2, 9, 10, 10]


# --- files and options -------------------------------------------------------------------------

def _evaluate_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--plan", "no-plan.json", "--out", "no-out", *map(str, args)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_options_and_files_errors_are_one_line(tmp_path, capsys, random_inception):
    good = _save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    assert "--inception-weights needs --fid-ref" in _evaluate_error(capsys, "--inception-weights", random_inception)
    assert "--fid-ref needs --inception-weights" in _evaluate_error(capsys, "--fid-ref", good)
    err = _evaluate_error(capsys, "--inception-weights", tmp_path / "none.pth", "--fid-ref", good)
    assert "none.pth: no such file (--inception-weights)" in err
    err = _evaluate_error(capsys, "--inception-weights", random_inception, "--fid-ref", tmp_path / "none.npz")
    assert "none.npz: no such file (--fid-ref)" in err
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(2048), arr_0=np.zeros(3))
    err = _evaluate_error(capsys, "--inception-weights", random_inception, "--fid-ref", tmp_path / "nosigma.npz")
    assert "nosigma.npz: no key 'sigma'" in err and "arr_0" in err
    _save_stats(tmp_path / "small.npz", np.zeros(64), np.eye(2048))
    err = _evaluate_error(capsys, "--inception-weights", random_inception, "--fid-ref", tmp_path / "small.npz")
    assert "small.npz: key 'mu' is float64 (64,), expected floats of shape (2048,)" in err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    err = _evaluate_error(capsys, "--inception-weights", random_inception, "--fid-ref", tmp_path / "junk.npz")
    assert "junk.npz: not a readable .npz file" in err
    err = _evaluate_error(capsys, "--inception-weights", random_inception, "--fid-ref", good, "--costs-only")
    assert "--costs-only" in err


def test_weights_are_checked_and_loaded_without_code(tmp_path, random_inception):
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"other.pth: not torch-fidelity's InceptionV3 weights: missing key "
                                        r"'Conv2d_1a_3x3.conv.weight' \(and \d+ more\)"):
        im.load_inception(tmp_path / "other.pth")
    sd = torch.load(random_inception, weights_only=True)
    sd["fc.weight"] = torch.zeros(10, 2048)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"shape.pth: key 'fc.weight' has shape \(10, 2048\), expected \(1008, 2048\)"):
        im.load_inception(tmp_path / "shape.pth")

    class Code:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Code()}, tmp_path / "code.pth")
    with pytest.raises(UserError, match="refused"):
        im.load_inception(tmp_path / "code.pth")


def test_missing_option_exits_nonzero_from_the_command_line(tmp_path):
    r = run_cli("compiler.evaluate", "--plan", tmp_path / "p.json", "--fid-ref", tmp_path / "r.npz", "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --fid-ref needs --inception-weights too: FID and Inception Score need both files (nothing is downloaded)")


# --- end to end --------------------------------------------------------------------------------

def test_fid_against_the_statistics_of_the_same_images_is_zero(tmp_path, random_inception):
    images = _images(4)
    feats, logits = im.inception_features(im.load_inception(random_inception), images, batch=3)
    assert feats.shape == (4, 2048) and logits.shape == (4, 1008)
    mu, sigma = im.feature_stats(feats)
    assert np.trace(sigma) > 1e-3 * (mu @ mu)  # the features tell the images apart
    ref = _save_stats(tmp_path / "ref.npz", mu.astype(np.float32), sigma.astype(np.float32), mu_s=np.zeros(3))
    r = im.InceptionMetrics(random_inception, ref)(images, batch=3)
    assert abs(r["fid"]) < 1e-6 * np.trace(sigma), (r["fid"], np.trace(sigma))  # float32 statistics
    assert math.isfinite(r["inception_score"]) and r["inception_score"] >= 1.0 and r["inception_score_splits"] == 1
    assert r["inception_score"] == pytest.approx(im.inception_score(logits))
    # another reference mean moves FID by ‖Δμ‖²
    delta = np.full(2048, 0.01)
    assert im.fid_against_stats(feats, mu + delta, sigma) == pytest.approx(delta @ delta, abs=1e-6 * np.trace(sigma))


def test_evaluate_reports_fid_and_inception_score(tiny_ckpts, tmp_path, random_inception):
    plan = Plan.empty(TINY_VAR)  # dense attention, every linear layer W8A8
    for name in linear_layer_names(TINY_VAR):
        plan.quant_layers[name] = {"scheme": "w8a8", "group": None}
    plan.save(tmp_path / "plan.json")
    ref = _save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048) * 1e-2)
    r = run_cli("compiler.evaluate", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--plan", tmp_path / "plan.json",
                "--samples", 2, "--greedy-samples", 1, "--top-k", 20, "--inception-weights", random_inception,
                "--fid-ref", ref, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    for key in ("fid", "inception_score"):
        assert set(rep[key]) == {"reference", "compressed"}
        assert all(math.isfinite(v) for v in rep[key].values()), rep[key]
    assert min(rep["fid"].values()) > 0 and min(rep["inception_score"].values()) >= 1.0
    assert rep["inception_score_splits"] == 1
    assert "| fid |" in (tmp_path / "ev" / "report.md").read_text()
