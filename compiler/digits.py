"""The demo data set and its judge.

    python -m compiler.digits DIR/samples.npz    # class consistency and digits-FID of samples
    python -m compiler.digits --baseline 400     # the same for 400 real training digits

Data: scikit-learn's handwritten digits (1,797 images of 8×8, shipped inside the package, so
nothing is downloaded), upsampled to 32×32 RGB and augmented with small random affine moves.

Judge: a small CNN digit classifier. It scores generated samples by class consistency (share
classified as the class asked for) and "digits-FID", the Fréchet distance between its
penultimate features of samples and of held-out real digits.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10


def load_split(split: str):
    """('train' | 'test') → (images N×1×8×8 float in [0,1], labels N). Fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))
    cut = int(0.8 * len(perm))
    idx = perm[:cut] if split == "train" else perm[cut:]
    x = torch.tensor(d.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[idx], dtype=torch.long)


def render(x8, gen: torch.Generator | None = None, augment=False):
    """8×8 digits → 32×32 RGB in [-1, 1]; with `augment`, a random rotation/scale/shift."""
    x = F.interpolate(x8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    if augment:
        N = x.shape[0]
        u = torch.rand(N, 4, generator=gen) * 2 - 1
        ang, s = u[:, 0] * math.radians(12), 1 + 0.1 * u[:, 1]
        theta = torch.stack([
            torch.stack([torch.cos(ang) / s, -torch.sin(ang) / s, 0.12 * u[:, 2]], 1),
            torch.stack([torch.sin(ang) / s, torch.cos(ang) / s, 0.12 * u[:, 3]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous()


class DigitJudge(nn.Module):
    """CNN classifier on 32×32 grey images in [0, 1]; `features` is the penultimate layer."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16×16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        )
        self.fc = nn.Linear(64 * 16, 128)
        self.out = nn.Linear(128, NUM_CLASSES)

    def features(self, img01):
        """img01: B×3×H×W (or B×1×H×W) in [0, 1] → B×128."""
        x = img01.mean(dim=1, keepdim=True)
        if x.shape[-1] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, img01):
        return self.out(self.features(img01))


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in FID).

    tr(sqrt(Σa·Σb)) is taken as Σ sqrt(eig(√Σa·Σb·√Σa)), a symmetric form that stays stable
    when the covariances are singular (ReLU features often are)."""
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    cov_a, cov_b = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    w, V = np.linalg.eigh(cov_a)
    sqrt_a = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


@functools.lru_cache(maxsize=4)
@torch.no_grad()
def heldout_features(judge: DigitJudge) -> np.ndarray:
    """The judge's features of the held-out real digits (the digits-FID reference), computed once."""
    judge.eval()
    x8, _ = load_split("test")
    return judge.features((render(x8) + 1) / 2).double().numpy()


@torch.no_grad()
def judge_samples(judge: DigitJudge, images01: torch.Tensor, labels) -> dict:
    """Class consistency and digits-FID of samples (B×3×H×W in [0, 1]) against held-out digits."""
    judge.eval()
    labels = torch.as_tensor(labels)
    pred = judge(images01).argmax(1)
    fid = frechet_distance(judge.features(images01).double().numpy(), heldout_features(judge))
    return {"class_consistency": float((pred == labels).float().mean()), "digits_fid": fid}


def load_judge() -> DigitJudge:
    from compiler.checkpoint import DEMO_DIR, load_state_dict, load_strict

    judge = DigitJudge()
    load_strict(judge, load_state_dict(DEMO_DIR / "digit_judge.pth"), DEMO_DIR / "digit_judge.pth")
    return judge.eval()


def main(argv=None):
    import argparse
    import json

    from compiler.errors import UserError, cli

    @cli
    def run(argv):
        ap = argparse.ArgumentParser(prog="python -m compiler.digits", description="Score demo-model samples.")
        ap.add_argument("samples", nargs="?", help="samples.npz written by compiler.sample or device.generate")
        ap.add_argument("--baseline", type=int, metavar="N",
                        help="instead, score N real training digits: the digits-FID real data gets")
        args = ap.parse_args(argv)
        if args.baseline:
            x8, y = load_split("train")
            real = (render(x8[:args.baseline]) + 1) / 2
            print(json.dumps(judge_samples(load_judge(), real, y[:args.baseline]), indent=2))
            return
        if not args.samples:
            raise UserError("give a samples.npz, or --baseline N")
        try:
            data = np.load(args.samples, allow_pickle=False)
            images, labels = data["images"], data["labels"]
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{args.samples}: not a samples.npz with 'images' and 'labels' ({e})") from None
        print(json.dumps(judge_samples(load_judge(), torch.from_numpy(images), labels), indent=2))

    return run(argv)


if __name__ == "__main__":
    main()
