"""Calibration: sample images with dense attention computed explicitly and measure
- per (block, head, query scale, key scale): the attention mass, and how much of it lies
  inside each diagonal window candidate (for MDWA);
- per (block, scale): how close the unconditional half's attention output is to what sharing
  the conditional half would give (for ASC), in both sharing variants;
- mean attention maps of the last scales (for the plots).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from compiler.compress.mdwa import WINDOW_CANDIDATES, scale_of_kv_len, window_statistics
from compiler.sampler import generate


@dataclass
class CalibrationStats:
    block_mass: np.ndarray    # depth×H×S×S: summed attention mass of query scale q on key scale k
    window_mass: np.ndarray   # depth×H×S×S×C: the part inside window candidate c
    queries: np.ndarray       # S: number of (sample, query) rows summed per query scale
    cos: np.ndarray           # depth×S: mean cosine(cond output, uncond output)
    sim_map: np.ndarray       # depth×S: 1 − rel. error of uncond output with the cond weights
    sim_output: np.ndarray    # depth×S: 1 − rel. error of uncond output replaced by the cond one
    maps: dict                # "b{b}_h{h}_q{q}" → mean attention map (n_q×L_q), last scales only
    candidates: tuple = WINDOW_CANDIDATES

    def mean_block_mass(self):
        """Attention mass per query (block_mass averaged over the summed query rows)."""
        return self.block_mass / self.queries[None, None, :, None]

    def mean_window_mass(self):
        return self.window_mass / self.queries[None, None, :, None, None]

    def save(self, path):
        np.savez_compressed(path, block_mass=self.block_mass, window_mass=self.window_mass, queries=self.queries,
                            cos=self.cos, sim_map=self.sim_map, sim_output=self.sim_output,
                            candidates=np.asarray(self.candidates), **{f"map_{k}": v for k, v in self.maps.items()})

    @staticmethod
    def load(path) -> "CalibrationStats":
        d = np.load(path, allow_pickle=False)
        maps = {k[4:]: d[k] for k in d.files if k.startswith("map_")}
        return CalibrationStats(d["block_mass"], d["window_mass"], d["queries"], d["cos"], d["sim_map"],
                                d["sim_output"], maps, tuple(int(c) for c in d["candidates"]))


class _Recorder:
    """Dense attention for one block, computed explicitly so its weights can be measured."""

    def __init__(self, b, acc, patch_nums, map_scales):
        self.b, self.acc, self.patch_nums, self.map_scales = b, acc, patch_nums, map_scales
        self.scale_of = scale_of_kv_len(patch_nums)

    def __call__(self, q, k, v, attn_bias=None):
        qs = self.scale_of[k.shape[2]]
        P = (q @ k.transpose(-1, -2)).softmax(-1)
        out = P @ v
        a, b = self.acc, self.b
        block, window = window_statistics(P, self.patch_nums, qs)
        a["block_mass"][b, :, qs, :qs + 1] += block
        a["window_mass"][b, :, qs, :qs + 1] += window
        if b == 0:
            a["queries"][qs] += P.shape[0] * P.shape[2]
        B = q.shape[0] // 2
        flat = lambda t: t.transpose(1, 2).flatten(2).double()  # noqa: E731  N×n×(H·c)
        oc, ou, om = flat(out[:B]), flat(out[B:]), flat(P[:B] @ v[B:])
        a["cos"][b, qs] += float(F.cosine_similarity(oc, ou, dim=-1).sum())
        a["err_map"][b, qs] += float((om - ou).norm(dim=-1).sum())
        a["err_output"][b, qs] += float((oc - ou).norm(dim=-1).sum())
        a["norm"][b, qs] += float(ou.norm(dim=-1).sum())
        a["tokens"][b, qs] += oc.shape[0] * oc.shape[1]
        if qs in self.map_scales:
            for h in range(P.shape[1]):
                key = f"b{b}_h{h}_q{qs}"
                a["maps"][key] = a["maps"].get(key, 0) + P[:, h].double().sum(0).numpy()
        return out


@torch.no_grad()
def calibrate(var, vae, labels, *, cfg=4.0, top_k=900, top_p=0.95, seed=0, batch=16, progress=None):
    """Generate one image per label with recording attention; returns CalibrationStats."""
    c = var.cfg
    S, C = len(c.patch_nums), len(WINDOW_CANDIDATES)
    acc = {"block_mass": np.zeros((c.depth, c.heads, S, S)), "window_mass": np.zeros((c.depth, c.heads, S, S, C)),
           "queries": np.zeros(S), "cos": np.zeros((c.depth, S)), "err_map": np.zeros((c.depth, S)),
           "err_output": np.zeros((c.depth, S)), "norm": np.zeros((c.depth, S)), "tokens": np.zeros((c.depth, S)),
           "maps": {}}
    map_scales = set(range(max(0, S - 3), S))
    saved = [blk.attn.attend for blk in var.blocks]
    try:
        for b, blk in enumerate(var.blocks):
            blk.attn.attend = _Recorder(b, acc, c.patch_nums, map_scales)
        for k, i in enumerate(range(0, len(labels), batch)):
            generate(var, vae, labels[i:i + batch], cfg=cfg, top_k=top_k, top_p=top_p, seed=seed + k)
            if progress is not None:
                progress(len(labels[i:i + batch]))
    finally:
        for blk, attend in zip(var.blocks, saved):
            blk.attn.attend = attend
    n = len(labels)
    maps = {k: (v / n).astype(np.float32) for k, v in acc["maps"].items()}
    tokens = np.maximum(acc["tokens"], 1)
    norm = np.maximum(acc["norm"], 1e-12)
    return CalibrationStats(acc["block_mass"], acc["window_mass"], acc["queries"], acc["cos"] / tokens,
                            1 - acc["err_map"] / norm, 1 - acc["err_output"] / norm, maps)


def spread_labels(n: int, num_classes: int) -> list:
    """n class ids spread evenly over all classes."""
    return [i * num_classes // n for i in range(n)]


def layer_type(name: str) -> str:
    """'blocks.3.ffn.fc2' → 'ffn.fc2'; 'blocks.0.ada_lin.1' → 'ada_lin'; 'head' → 'head'."""
    parts = name.split(".")
    if parts[0] == "blocks":
        parts = parts[2:]
    if parts[-1] == "1":  # the Linear inside an nn.Sequential(SiLU, Linear)
        parts = parts[:-1]
    return ".".join(parts)


def plan_from_stats(stats: CalibrationStats, cfg, *, mdwa_threshold=0.95, dense_scales=3, drop_share=0.0,
                    asc_threshold=None, asc_mode="map", quant=None, protect=None, attention_bits=None, info=None):
    """A Plan from calibration statistics and the chosen thresholds.

    quant: (scheme, group) for every quantizable layer, or None; protect: {layer type: (scheme, group)}.
    mdwa_threshold / asc_threshold None leave that technique out."""
    from compiler.compress.mdwa import choose_windows
    from compiler.compress.plan import Plan, linear_layer_names

    plan = Plan.empty(cfg)
    plan.calibration = dict(info or {})
    plan.attention_bits = attention_bits
    if mdwa_threshold is not None:
        plan.windows = choose_windows(stats.mean_block_mass(), stats.mean_window_mass(), cfg.patch_nums, mdwa_threshold, dense_scales, drop_share, stats.candidates)
        plan.mdwa_threshold = mdwa_threshold
        plan.calibration.update(dense_scales=dense_scales, drop_share=drop_share)
    if asc_threshold is not None:
        sim = stats.sim_map if asc_mode == "map" else stats.sim_output
        plan.asc_share = [[bool(sim[b, q] >= asc_threshold) for q in range(len(cfg.patch_nums))]
                          for b in range(cfg.depth)]
        plan.asc_mode, plan.asc_threshold = asc_mode, asc_threshold
    if quant is not None or protect:
        for name in linear_layer_names(cfg):
            if name == "word_embed":  # 32 inputs from the VQVAE: tiny, kept in float
                continue
            scheme, group = (protect or {}).get(layer_type(name), quant or ("fp32", None))
            if scheme != "fp32":
                plan.quant_layers[name] = {"scheme": scheme, **({"group": group} if scheme.startswith("w4") else {})}
    return plan
