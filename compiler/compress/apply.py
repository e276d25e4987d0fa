"""Apply a plan to a reference VAR: the PyTorch simulation of what the compiled build runs,
plus the plan's costs (attention multiply-adds, weight bytes)."""
from __future__ import annotations

import copy

from compiler.compress.attention import CompressedAttention
from compiler.compress.mdwa import kept_pairs
from compiler.compress.plan import Plan, linear_layer_names
from compiler.compress.quant import QuantLinear, make_scheme
from compiler.model.config import VARConfig
from compiler.model.var import VAR


def apply_plan(var: VAR, plan: Plan) -> VAR:
    """A copy of `var` with the plan's windows, sharing and quantized layers."""
    model = copy.deepcopy(var)
    cfg = model.cfg
    for b, block in enumerate(model.blocks):
        windows = plan.windows[b] if plan.windows is not None else None
        share = plan.asc_share[b] if plan.asc_share is not None else None
        if windows is not None or (share is not None and any(share)) or plan.attention_bits:
            block.attn.attend = CompressedAttention(cfg.patch_nums, windows, share, plan.asc_mode, plan.attention_bits)
    for name in linear_layer_names(cfg):
        scheme, group = plan.layer_scheme(name)
        if scheme == "fp32":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(getattr(parent, child), make_scheme(scheme, group)))
    return model


def attention_macs(cfg: VARConfig, plan: Plan | None = None, batch: int = 1) -> tuple[int, int]:
    """(dense, planned) attention multiply-adds (QKᵀ and PV) of one CFG generation of `batch` images."""
    d, dense, planned = cfg.head_dim, 0, 0
    pns = cfg.patch_nums
    for q, pn in enumerate(pns):
        n_q, L_q = pn * pn, sum(p * p for p in pns[:q + 1])
        for b in range(cfg.depth):
            share = plan is not None and plan.asc_share is not None and plan.asc_share[b][q]
            for h in range(cfg.heads):
                pairs = n_q * L_q
                dense += 2 * batch * 2 * d * pairs  # cond + uncond, QK and PV
                if plan is not None and plan.windows is not None:
                    pairs = kept_pairs(plan.windows[b][h][q], pns, q)
                cond = 2 * d * pairs
                uncond = 0 if (share and plan.asc_mode == "output") else (d * pairs if share else 2 * d * pairs)
                planned += batch * (cond + uncond)
    return dense, planned


def kept_pair_fractions(cfg: VARConfig, plan: Plan) -> tuple[list, float]:
    """MDWA's kept (query, key) pairs / all pairs, per query scale and overall (all blocks, heads)."""
    per_scale, kept_all, dense_all = [], 0, 0
    for q, pn in enumerate(cfg.patch_nums):
        dense = pn * pn * sum(p * p for p in cfg.patch_nums[:q + 1]) * cfg.depth * cfg.heads
        kept = dense if plan.windows is None else sum(
            kept_pairs(plan.windows[b][h][q], cfg.patch_nums, q) for b in range(cfg.depth) for h in range(cfg.heads))
        per_scale.append(kept / dense)
        kept_all, dense_all = kept_all + kept, dense_all + dense
    return per_scale, kept_all / dense_all


def linear_macs(cfg: VARConfig, batch: int = 1) -> int:
    """Multiply-adds of the transformer's token-wise linear layers (qkv, proj, fc1, fc2, head)
    for one CFG generation of `batch` images (AdaLN runs once per image and is left out)."""
    C, tokens = cfg.width, 2 * batch * cfg.seq_len
    return tokens * (cfg.depth * (4 * C * C + 2 * C * cfg.mlp_hidden) + C * cfg.vocab_size)


def weight_bytes(var: VAR, plan: Plan | None = None) -> tuple[float, float]:
    """(fp16 bytes, planned bytes) of all parameters; unquantized tensors count at fp16."""
    quantized = {}
    if plan is not None:
        for name in linear_layer_names(var.cfg):
            scheme, group = plan.layer_scheme(name)
            if scheme != "fp32":
                quantized[name + ".weight"] = make_scheme(scheme, group)
    fp16 = planned = 0.0
    for name, p in var.named_parameters():
        fp16 += 2.0 * p.numel()
        s = quantized.get(name)
        planned += s.weight_bytes(*p.shape) if s is not None else 2.0 * p.numel()
    return fp16, planned
