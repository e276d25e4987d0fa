"""Attention as a plan asks for it: MDWA windows computed sparsely, and ASC sharing under CFG.

`CompressedAttention` replaces a block's `attn.attend`. It only computes the kept pairs: for a
windowed key scale each query gathers its own band of at most 2w keys; a dropped key scale is
never touched; a dense one is a plain matmul. The softmax runs over the concatenation of all
kept scores, so the result equals dense attention with −∞ on the masked pairs.
"""
from __future__ import annotations

import torch

from compiler.compress.mdwa import band_range, scale_of_kv_len
from compiler.compress.quant import fake_quant_per_token, quantize_map
from compiler.model.var import sdpa as dense_attention


def sparse_weights(q, k, windows_q, patch_nums):
    """Softmax weights over the kept keys for one head. q: N×n_q×c, k: N×L_q×c.

    Returns a list of (P, index) per kept key scale: P is N×n_q×n_k for a dense scale (index
    None) or N×n_q×W for a windowed one, with index (n_q×W keys, −1 where unused)."""
    n_q = q.shape[1]
    scores, parts, start = [], [], 0
    for ks, w in enumerate(windows_q):
        n_k = patch_nums[ks] ** 2
        kk = k[:, start:start + n_k]
        if w is None:
            scores.append(q @ kk.transpose(1, 2))
            parts.append((start, None, n_k))
        elif w > 0:
            lo, hi = band_range(n_q, n_k, w)
            width = int((hi - lo + 1).clamp(min=0).max())
            idx = lo[:, None] + torch.arange(width)[None, :]
            valid = idx <= hi[:, None]
            idx = torch.where(valid, idx, 0)
            kg = kk[:, idx]  # N×n_q×W×c, only the band
            s = torch.einsum("nqc,nqwc->nqw", q, kg).masked_fill(~valid, -torch.inf)
            scores.append(s)
            parts.append((start, torch.where(valid, idx, -1), width))
        start += n_k
    P = torch.cat(scores, dim=-1).softmax(dim=-1)
    out, off = [], 0
    for (start, idx, width) in parts:
        out.append((P[..., off:off + width], start, idx))
        off += width
    return out


def apply_weights(weights, v):
    """Σ over kept keys of P·v for the output of `sparse_weights`. v: N×L_q×c."""
    out = 0
    for P, start, idx in weights:
        if idx is None:
            out = out + P @ v[:, start:start + P.shape[-1]]
        else:
            vg = v[:, start + idx.clamp(min=0)]  # N×n_q×W×c
            out = out + torch.einsum("nqw,nqwc->nqc", P, vg)
    return out


class CompressedAttention:
    """One block's attention under a plan: MDWA `windows` [head][q][k] (or None), ASC `share` [q]
    (or None) in `mode` "map" or "output", and optionally Q/K/V and the attention map at
    `attn_bits` bits (fake-quantized: per-token symmetric Q/K/V, the map unsigned per row)."""

    def __init__(self, patch_nums, windows=None, share=None, mode="map", attn_bits=None):
        self.patch_nums = tuple(patch_nums)
        self.windows, self.share, self.mode, self.attn_bits = windows, share, mode, attn_bits
        self.scale_of = scale_of_kv_len(patch_nums)

    def _sparse(self, qs):
        return self.windows is not None and any(w is not None for h in self.windows for w in h[qs])

    def _weights(self, q, k, qs):
        """Per head, the softmax weights over the kept keys (see sparse_weights)."""
        out = []
        for h in range(q.shape[1]):
            windows = self.windows[h][qs] if self.windows is not None else [None] * (qs + 1)
            w = sparse_weights(q[:, h], k[:, h], windows, self.patch_nums)
            if self.attn_bits:
                row_max = torch.stack([P.amax(-1) for P, _, _ in w]).amax(0)
                w = [(quantize_map(P, row_max, self.attn_bits), start, idx) for P, start, idx in w]
            out.append(w)
        return out

    @staticmethod
    def _apply(weights, v):
        return torch.stack([apply_weights(w, v[:, h]) for h, w in enumerate(weights)], 1)

    def __call__(self, q, k, v, attn_bias=None):
        if attn_bias is not None:
            raise NotImplementedError("compressed attention runs on the cached per-scale path only")
        qs = self.scale_of[k.shape[2]]
        shared = self.share is not None and self.share[qs]
        if self.attn_bits:
            q, k, v = (fake_quant_per_token(t, self.attn_bits) for t in (q, k, v))
        elif not shared and not self._sparse(qs):
            return dense_attention(q, k, v)  # nothing of the plan applies at this scale
        if not shared:
            return self._apply(self._weights(q, k, qs), v)
        B = q.shape[0] // 2  # [conditional; unconditional]
        weights = self._weights(q[:B], k[:B], qs)
        out_c = self._apply(weights, v[:B])
        # "output": the unconditional half reuses the conditional output; "map": its weights
        out_u = out_c if self.mode == "output" else self._apply(weights, v[B:])
        return torch.cat((out_c, out_u))
