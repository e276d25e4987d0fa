"""The KV cache's layout, shared by the attention kernels, the graph and the tests (numpy only,
so that a board's runtime-only TVM can fill a cache too).

Per block: 2 × NB × H × (⌈L/8⌉·8·c) for L places, keys in panels of KB = 8 (panel t holds keys
8t … 8t+7, channel-major: c × 8), values row-major; each scale starts at a panel boundary.
schedules/attention.py says why.
"""
from __future__ import annotations

import numpy as np

KB = 8                # keys per panel (AVX2: one score vector)


def whole_panels(count):
    """Places that `count` keys take, rounded up to whole panels of KB."""
    return (count + KB - 1) // KB * KB


def cache_row(L: int, c: int) -> int:
    """Floats per (k or v, batch, head) row of the cache: whole panels of KB keys."""
    return whole_panels(L) * c


def scale_slots(patch_nums) -> np.ndarray:
    """S×2 int32, the kernels' `geom` table: each scale's first place in the cache (a multiple of
    KB) and its token count."""
    counts = np.array([p * p for p in patch_nums])
    places = whole_panels(counts)
    return np.stack([np.cumsum(places) - places, counts], 1).astype(np.int32)


def cache_len(patch_nums) -> int:
    """Places per (batch, head) in the cache: every scale's tokens, each scale padded to a panel."""
    return int(sum(whole_panels(p * p) for p in patch_nums))


def key_at(pos, cc, c: int):
    """Offset of channel cc of key `pos` in a keys row of the cache (TIR or numpy integers)."""
    return pos // KB * (KB * c) + cc * KB + pos % KB


def cache_of(kv, patch_nums=None):
    """numpy 2×NB×H×T×c keys and values of T tokens → the cache layout above, tokens at their
    scale_slots places (tests, benchmarks); without patch_nums, token t at place t."""
    _, NB, H, T_, c = kv.shape
    place = np.arange(T_) if patch_nums is None else np.concatenate(
        [first + np.arange(count) for first, count in scale_slots(patch_nums)])
    L = T_ if patch_nums is None else cache_len(patch_nums)
    cache = np.zeros((2, NB, H, cache_row(L, c)), np.float32)
    pos, cc = np.meshgrid(place, np.arange(c), indexing="ij")
    cache[0][:, :, key_at(pos, cc, c)] = kv[0]
    cache[1][:, :, (place[:, None] * c + np.arange(c)).ravel()] = kv[1].reshape(NB, H, -1)
    return cache
