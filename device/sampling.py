"""Token sampling on the board: top-k, then top-p, then one multinomial draw per token, in numpy.

Same filtering as the reference sampler (compiler/sampler.py); the random stream is numpy's
own (PCG64 seeded with --seed), so sampled tokens differ from PyTorch's while greedy decoding
(top-k 1) gives the same tokens.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def make_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(seed)))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 0.0) -> np.ndarray:
    """logits …×V → a copy with the filtered-out entries at −inf."""
    out = np.array(logits, dtype=np.float32, copy=True)
    V = out.shape[-1]
    if top_k > 0:
        k = min(top_k, V)
        kth = np.partition(out, V - k, axis=-1)[..., V - k:V - k + 1]  # the k-th largest value
        out[out < kth] = -np.inf
    if top_p > 0:
        order = np.argsort(out, axis=-1, kind="stable")  # ascending
        sorted_logits = np.take_along_axis(out, order, axis=-1)
        drop = np.cumsum(_softmax(sorted_logits), axis=-1) <= (1 - top_p)
        drop[..., -1] = False  # always keep the most likely token
        mask = np.zeros_like(drop)
        np.put_along_axis(mask, order, drop, axis=-1)
        out[mask] = -np.inf
    return out


def keep_mask(logits: np.ndarray, top_k: int = 0, top_p: float = 0.0) -> np.ndarray:
    """The entries filter_logits keeps, found by value thresholds instead of index sorts: the
    k-th largest value (np.partition), then the smallest value inside the top-p nucleus (one
    np.sort of values); equal to filter_logits but for exact ties at a threshold value. The
    nucleus rule of sample_tokens, written over the whole vocabulary."""
    V = logits.shape[-1]
    keep = np.ones(logits.shape, bool)
    if 0 < top_k < V:
        keep = logits >= np.partition(logits, V - top_k, axis=-1)[..., V - top_k:V - top_k + 1]
    if top_p > 0:
        vals = np.sort(np.where(keep, logits, -np.inf), axis=-1)          # ascending
        p = np.exp(vals - vals[..., -1:])
        cdf = np.cumsum(p, axis=-1, dtype=np.float64)
        dropped = (cdf <= (1 - top_p) * cdf[..., -1:]).sum(axis=-1, keepdims=True)
        dropped = np.minimum(dropped, V - 1)                               # keep the most likely
        keep &= logits >= np.take_along_axis(vals, dropped, axis=-1)
    return keep


PARALLEL_ROWS = 64   # from this many tokens on, the rows are split between the cores


def sample_tokens(logits: np.ndarray, top_k: int, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """logits …×V → token ids … (int64). top_k 1 is greedy and draws no random number.

    Works on values, never on index sorts (numpy's argsort is ~5× slower than its sort): the k
    largest values (np.partition), one np.sort of them, the nucleus and the draw from one
    cumulative sum, and finally the token holding the drawn value. The passes over the whole
    vocabulary of keep_mask cost ~60 µs a token here, more than the compiled transformer at
    the last scales. Same filtering as keep_mask; exact ties in value resolve to the first
    token holding it. Large scales are split into row blocks drawn on all cores (numpy's
    sorts and sums release the GIL, and the kernels' threads are idle between scales); the
    uniform numbers are drawn first, in row order, so the tokens do not depend on the split."""
    if top_k == 1:
        return logits.argmax(axis=-1).astype(np.int64)
    *lead, V = logits.shape
    x = logits.reshape(-1, V)
    k = top_k if 0 < top_k < V else V
    u = rng.random((len(x), 1))
    blocks = min(len(x) // PARALLEL_ROWS, _cores())
    if blocks > 1:
        cuts = np.linspace(0, len(x), blocks + 1).astype(int)
        parts = _pool().map(lambda a, b: _draw(x[a:b], u[a:b], k, top_p), cuts[:-1], cuts[1:])
        tokens = np.concatenate(list(parts))
    else:
        tokens = _draw(x, u, k, top_p)
    return tokens.reshape(lead)


def _draw(x: np.ndarray, u: np.ndarray, k: int, top_p: float) -> np.ndarray:
    """One token per row of x (rows × V) from its top-k / top-p nucleus, at quantile u (rows × 1)."""
    V = x.shape[1]
    # ascending; sorting everything beats partition + sort when most values are kept
    vals = np.sort(x, axis=-1)[:, V - k:] if 2 * k > V else np.sort(np.partition(x, V - k, axis=-1)[:, V - k:], axis=-1)
    # float32, like the reference's softmax().cumsum_() (float64 took 3× as long here)
    cdf = np.cumsum(np.exp(vals - vals[:, -1:]), axis=-1)
    first = np.zeros((len(x), 1), np.int64)                             # first value of the nucleus
    if top_p > 0:
        first = np.minimum((cdf <= (1 - top_p) * cdf[:, -1:]).sum(axis=-1, keepdims=True), k - 1)
    below = np.where(first > 0, np.take_along_axis(cdf, np.maximum(first - 1, 0), axis=-1), 0.0)
    u = below + u * (cdf[:, -1:] - below)
    pos = np.minimum((cdf <= u).sum(axis=-1, keepdims=True), k - 1)     # first value whose cdf exceeds u
    drawn = np.take_along_axis(vals, pos, axis=-1)
    return (x == drawn).argmax(axis=-1).astype(np.int64)


_POOL = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="sample")
    return _POOL
