"""The board-side pieces that need no compiled model: sampling in numpy, artifact checks, no torch."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from compiler.sampler import filter_top_k_top_p
from device.artifact import ArtifactError, load_manifest, write_manifest
from device.sampling import filter_logits, keep_mask, make_rng, sample_tokens
from tests.conftest import ROOT


def test_device_modules_never_import_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "import device.sampling, device.artifact\n"
            "import numpy as np; device.sampling.sample_tokens(np.zeros((1, 2, 5)), 3, 0.9, device.sampling.make_rng(0))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("top_k, top_p", [(7, 0.0), (0, 0.8), (7, 0.8), (900, 0.95), (1, 0.0)])
def test_filtering_matches_the_reference_sampler(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g) * 3
    ref = torch.isfinite(filter_top_k_top_p(logits, top_k, top_p)).numpy()
    ours = np.isfinite(filter_logits(logits.numpy(), top_k, top_p))
    assert np.array_equal(ref, ours)
    assert np.array_equal(ref, keep_mask(logits.numpy(), top_k, top_p))   # the rule sample_tokens follows


def test_greedy_is_argmax_and_sampling_follows_the_distribution():
    logits = np.log(np.array([[[0.1, 0.6, 0.05, 0.25]]], np.float32))
    assert sample_tokens(logits, 1, 0.0, make_rng(0)).tolist() == [[1]]
    rng = make_rng(0)
    draws = np.concatenate([sample_tokens(np.repeat(logits, 1000, axis=1), 0, 0.0, rng).ravel() for _ in range(20)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - [0.1, 0.6, 0.05, 0.25]).max() < 0.015
    # top-k 2 never draws outside the two best
    assert set(sample_tokens(np.repeat(logits, 500, axis=1), 2, 0.0, make_rng(1)).ravel()) == {1, 3}
    # same seed, same tokens
    a = sample_tokens(np.repeat(logits, 50, axis=1), 0, 0.9, make_rng(5))
    assert np.array_equal(a, sample_tokens(np.repeat(logits, 50, axis=1), 0, 0.9, make_rng(5)))


def test_sampling_split_between_cores_gives_the_same_tokens(monkeypatch):
    """Large scales are drawn in row blocks on all cores: the same tokens as in one block."""
    import device.sampling as sampling
    logits = np.random.default_rng(3).standard_normal((2, 300, 64)).astype(np.float32) * 3
    monkeypatch.setattr(sampling, "_cores", lambda: 3)
    split = sample_tokens(logits, 40, 0.9, make_rng(7))
    monkeypatch.setattr(sampling, "PARALLEL_ROWS", 10 ** 9)
    assert np.array_equal(split, sample_tokens(logits, 40, 0.9, make_rng(7)))


@pytest.mark.parametrize("top_k, top_p", [(7, 0.0), (7, 0.8), (40, 0.95)])
def test_top_k_sampling_draws_from_the_filtered_distribution(top_k, top_p):
    """sample_tokens selects the k candidates first: its draws follow softmax(filter_logits)."""
    logits = np.random.default_rng(2).standard_normal((1, 1, 50)).astype(np.float32) * 2
    f = filter_logits(logits, top_k, top_p)[0, 0].astype(np.float64)
    want = np.exp(f - f.max())
    want /= want.sum()
    draws = sample_tokens(np.repeat(logits, 40000, axis=1), top_k, top_p, make_rng(0)).ravel()
    freq = np.bincount(draws, minlength=50) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    assert np.abs(freq - want).max() < 0.01


def test_artifact_checksums(tmp_path):
    (tmp_path / "lib.so").write_bytes(b"\x7fELF" + bytes(100))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(bytes(range(256)))
    write_manifest(tmp_path, {"schema": 1})
    assert set(load_manifest(tmp_path)["files"]) == {"lib.so", "weights/w.bin"}

    data = bytearray((tmp_path / "weights" / "w.bin").read_bytes())
    data[10] ^= 1
    (tmp_path / "weights" / "w.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="w.bin: sha256 does not match"):
        load_manifest(tmp_path)
    (tmp_path / "weights" / "w.bin").unlink()
    with pytest.raises(ArtifactError, match="w.bin: listed in manifest.json but missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"files": {"../etc/passwd": "0"}}')
    with pytest.raises(ArtifactError, match="points outside the artifact"):
        load_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_manifest(tmp_path / "weights")
