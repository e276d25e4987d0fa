"""Multi-Diagonal Windowed Attention: which (query, key) pairs a plan keeps, and choosing them.

A query i of scale q (n_q tokens) keeps key j of scale k (n_k tokens) in a window w when
|i·n_k/n_q − j| < w (flattened indices); we test it in integers as |i·n_k − j·n_q| < w·n_q so
that every implementation (PyTorch here, TVM kernels later) keeps exactly the same pairs.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

WINDOW_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def band_mask(n_q: int, n_k: int, w) -> torch.Tensor:
    """Bool n_q×n_k: the pairs a window keeps (None: all, 0: none)."""
    if w is None:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    return (i * n_k - j * n_q).abs() < w * n_q


def band_range(n_q: int, n_k: int, w: int):
    """Per query, the first and last kept key (inclusive, clipped); empty rows have lo > hi."""
    i = torch.arange(n_q)
    lo = -((-(i * n_k - w * n_q + 1)) // n_q)  # smallest j with j·n_q > i·n_k − w·n_q
    hi = (i * n_k + w * n_q - 1) // n_q        # largest j with j·n_q < i·n_k + w·n_q
    return lo.clamp(min=0), hi.clamp(max=n_k - 1)


def scale_mask(windows_q, patch_nums, q: int) -> torch.Tensor:
    """Bool n_q × (tokens of scales 0..q): the keys each query of scale q keeps."""
    n_q = patch_nums[q] ** 2
    return torch.cat([band_mask(n_q, patch_nums[k] ** 2, w) for k, w in enumerate(windows_q)], dim=1)


@lru_cache(maxsize=None)
def band_pairs(n_q: int, n_k: int, w) -> int:
    """Number of pairs a window keeps; cached, since plans repeat the same few shapes thousands of times."""
    return int(band_mask(n_q, n_k, w).sum())


def kept_pairs(windows_q, patch_nums, q: int) -> int:
    n_q = patch_nums[q] ** 2
    return sum(band_pairs(n_q, patch_nums[k] ** 2, w) for k, w in enumerate(windows_q))


def scale_of_kv_len(patch_nums) -> dict:
    """KV length after scale s (tokens of scales 0..s) → s: how attention knows its scale."""
    ends = np.cumsum([p * p for p in patch_nums])
    return {int(e): s for s, e in enumerate(ends)}


def coarse_keys_always_kept(q: int) -> int:
    """LiteVAR keeps the keys of scales 0–1 for query scales 3–4 and 0–2 from scale 5 on."""
    return 0 if q < 3 else (2 if q < 5 else 3)


def choose_windows(block_mass, window_mass, patch_nums, threshold=0.95, dense_scales=3, drop_share=0.0,
                   candidates=WINDOW_CANDIDATES, keep_coarse=True):
    """Windows [block][head][q][k] from calibration statistics.

    block_mass[b, h, q, k]: mean attention mass a query of scale q puts on key scale k;
    window_mass[b, h, q, k, c]: the part of it inside window candidates[c].
    The smallest window holding ≥ `threshold` of its key block's mass wins; none → dense.
    Query scales below `dense_scales` stay dense, and with `keep_coarse` so do the coarse key
    scales LiteVAR always keeps. A key scale (not the query's own) holding less than
    `drop_share` of a query's mass is dropped.
    """
    depth, heads = block_mass.shape[:2]
    out = []
    for b in range(depth):
        per_head = []
        for h in range(heads):
            per_q = []
            for q in range(len(patch_nums)):
                n_q, row = patch_nums[q] ** 2, []
                for k in range(q + 1):
                    n_k = patch_nums[k] ** 2
                    mass = block_mass[b, h, q, k]
                    w = None
                    if q >= dense_scales and (not keep_coarse or k >= coarse_keys_always_kept(q)):
                        if drop_share > 0 and k != q and mass < drop_share:
                            w = 0
                        else:
                            for c, cand in enumerate(candidates):
                                if band_pairs(n_q, n_k, cand) == n_q * n_k:
                                    break  # this window keeps everything: dense it is
                                if window_mass[b, h, q, k, c] >= threshold * mass:
                                    w = int(cand)
                                    break
                    row.append(w)
                per_q.append(row)
            per_head.append(per_q)
        out.append(per_head)
    return out


def window_statistics(P, patch_nums, q: int, candidates=WINDOW_CANDIDATES):
    """From attention probabilities P (N×H×n_q×L_q) of query scale q: the summed mass per key
    scale (H×(q+1)) and inside each window candidate (H×(q+1)×C), summed over N and queries."""
    H = P.shape[1]
    n_q = patch_nums[q] ** 2
    block = np.zeros((H, q + 1))
    window = np.zeros((H, q + 1, len(candidates)))
    start = 0
    for k in range(q + 1):
        n_k = patch_nums[k] ** 2
        Pk = P[..., start:start + n_k].double().sum(0)  # H×n_q×n_k
        start += n_k
        block[:, k] = Pk.sum((1, 2)).numpy()
        i = torch.arange(n_q)[:, None]
        j = torch.arange(n_k)[None, :]
        dist_num = (i * n_k - j * n_q).abs()  # < w·n_q ⇔ inside window w
        for c, w in enumerate(candidates):
            window[:, k, c] = (Pk * (dist_num < w * n_q)).sum((1, 2)).numpy()
    return block, window
