"""FID and Inception Score of sampled images, with torch-fidelity's InceptionV3 and files the user
passes; nothing is downloaded.

- The network is torch-fidelity's `FeatureExtractorInceptionV3`, a port of the TensorFlow
  Inception graph (2015-12-05) that the FID/IS reference implementations use (TF1 bilinear
  resize to 299², input scaled as (x - 128) / 128). Its weights file is
  `weights-inception-2015-12-05-6726825d.pth` from torch-fidelity's v0.2.0 release; we read it
  with `torch.load(weights_only=True)` and hand torch-fidelity a re-serialised copy of the
  checked tensors through `feature_extractor_weights_path`, so it never downloads and never
  unpickles the user's file itself.
- FID is the Fréchet distance between a Gaussian fitted to the 2048-d pool features of the
  samples and the reference statistics `mu` (2048,) and `sigma` (2048, 2048) of an .npz file,
  the format of the ADM (guided-diffusion) reference batches such as
  `VIRTUAL_imagenet256_labeled.npz`.
- IS is exp(E KL(p(y|x) ‖ p(y))) over the network's 1008 logits without the bias
  (torch-fidelity's `logits_unbiased`, its choice for IS), averaged over splits after a fixed
  shuffle, as torch-fidelity does: 10 splits, or N // 10 (at least 1) when there are fewer
  than 100 images, so every split holds at least 10.

Both numbers depend strongly on the number of images (FID is biased upwards for small N);
compare only numbers taken with the same N.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

from compiler.checkpoint import load_state_dict
from compiler.errors import UserError

FEATURE_DIM = 2048
IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed


def _extractor_class():
    """torch-fidelity's FeatureExtractorInceptionV3.

    The package's __init__ also imports its data-set helpers, which need torchvision; the PyPI
    torchvision wheel is built against the CUDA build of torch and fails to import next to the
    CPU build (RuntimeError: operator torchvision::nms does not exist). The Inception module
    itself needs only torch, so when the package import fails the module is imported on its
    own, under a bare package object that is removed again afterwards."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            raise UserError("FID and Inception Score need torch-fidelity: pip install torch-fidelity") from None
        first_error = e
    except Exception as e:  # noqa: BLE001  (a broken torchvision raises RuntimeError)
        first_error = e
    spec = importlib.util.find_spec("torch_fidelity")
    name = "torch_fidelity.feature_extractor_inceptionv3"
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    saved = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = stub
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot import torch-fidelity's InceptionV3 ({type(first_error).__name__}: "
                        f"{str(first_error).splitlines()[0] if str(first_error) else ''}; then {e})") from None
    finally:
        if saved is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = saved


def load_inception(weights_path) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with the given weights, giving (2048-d pool features,
    unbiased logits) for B×3×H×W uint8 images; every problem with the file is a UserError."""
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (--inception-weights)")
    sd = load_state_dict(path)  # weights_only=True; UserError for a missing or unsafe file
    base = _extractor_class()

    class CheckedInception(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            want = self.state_dict()
            for what, keys in (("missing", [k for k in want if k not in state_dict]),
                               ("unexpected", [k for k in state_dict if k not in want])):
                if keys:
                    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
                    raise UserError(f"{path}: not torch-fidelity's InceptionV3 weights: {what} key '{keys[0]}'{more}")
            for k, v in want.items():
                if tuple(state_dict[k].shape) != tuple(v.shape):
                    raise UserError(f"{path}: key '{k}' has shape {tuple(state_dict[k].shape)}, "
                                    f"expected {tuple(v.shape)}")
            return super().load_state_dict(state_dict, strict=True)

    buf = io.BytesIO()
    torch.save(sd, buf)  # only the tensors checked above reach torch-fidelity's torch.load
    buf.seek(0)
    return CheckedInception("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buf)


def load_reference_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz holding `mu` (2048,) and `sigma` (2048, 2048), as float64."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (--fid-ref)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for key, shape in (("mu", (FEATURE_DIM,)), ("sigma", (FEATURE_DIM, FEATURE_DIM))):
                if key not in z.files:
                    raise UserError(f"{path}: no key '{key}' (expected FID statistics 'mu' and 'sigma'; "
                                    f"the file holds {', '.join(z.files) or 'nothing'})")
                a = z[key]
                if a.shape != shape or a.dtype.kind != "f":
                    raise UserError(f"{path}: key '{key}' is {a.dtype} {a.shape}, expected floats of shape {shape}")
                if not np.isfinite(a).all():
                    raise UserError(f"{path}: key '{key}' holds NaN or infinite values")
                arrays[key] = a.astype(np.float64)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return arrays["mu"], arrays["sigma"]


@torch.no_grad()
def inception_features(net, images_u8: torch.Tensor, batch: int = 25, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(pool features N×2048, unbiased logits N×1008) of N×3×H×W uint8 images, as float64."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"expected N×3×H×W uint8 images, got {images_u8.dtype} {tuple(images_u8.shape)}")
    feats, logits = [], []
    for i in range(0, len(images_u8), batch):
        f, lg = net(images_u8[i:i + batch])
        feats.append(f.double())
        logits.append(lg.double())
        if progress is not None:
            progress(len(f))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def fid_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb).

    tr √(Σa Σb) is taken as Σ √eig(√Σa Σb √Σa) (a symmetric matrix with the same eigenvalues),
    which stays stable when a covariance is singular, as it is for fewer than 2049 images."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    w, V = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
    sqrt_a = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    m = sqrt_a @ sigma_b @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * tr_covmean)


def fid_against_stats(features: np.ndarray, mu, sigma) -> float:
    """FID of N×D features against reference statistics (mu, sigma).

    With N ≤ D the samples' covariance Σa = XᵀX / (N − 1) (X centred) has rank < N, and the
    nonzero eigenvalues of Σa Σb are those of the N×N matrix X Σb Xᵀ / (N − 1): the same number
    as fid_from_stats gives, from an N×N instead of a D×D eigendecomposition, and without the
    square roots of the D − N rounding-level eigenvalues."""
    features = np.asarray(features, np.float64)
    n, d = features.shape
    if n > d:
        return fid_from_stats(*feature_stats(features), mu, sigma)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    mu_a = features.mean(0)
    x = features - mu_a
    m = x @ sigma @ x.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu_a - mu
    return float(diff @ diff + (x * x).sum() / (n - 1) + np.trace(sigma) - 2 * tr_covmean)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with N − 1) of N×D features, as the FID reference batches store them."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def is_splits(n: int) -> int:
    """10 splits, or n // 10 (at least 1) below 100 images, so a split holds at least 10."""
    return max(1, min(IS_SPLITS, n // 10))


def inception_score(logits: np.ndarray, splits: int | None = None) -> float:
    """Mean over splits of exp(mean KL(p(y|x) ‖ p(y))), after torch-fidelity's fixed shuffle."""
    logits = torch.as_tensor(np.asarray(logits, np.float64))
    n = len(logits)
    splits = is_splits(n) if splits is None else splits
    logits = logits[np.random.RandomState(IS_SHUFFLE_SEED).permutation(n)]
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(0, keepdim=True)
        scores.append(float((p[lo:hi] * (log_p[lo:hi] - q.log())).sum(1).mean().exp()))
    return float(np.mean(scores))


class InceptionMetrics:
    """FID against fixed reference statistics and IS, for several image sets in turn."""

    def __init__(self, weights_path, ref_path):
        self.mu, self.sigma = load_reference_stats(ref_path)
        self.net = load_inception(weights_path)

    def __call__(self, images_u8: torch.Tensor, batch: int = 25, progress=None) -> dict:
        feats, logits = inception_features(self.net, images_u8, batch, progress)
        return {"fid": fid_against_stats(feats, self.mu, self.sigma), "inception_score": inception_score(logits),
                "inception_score_splits": is_splits(len(logits))}
