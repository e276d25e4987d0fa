"""Reference sampler: the official `autoregressive_infer_cfg`, step for step.

This is the contract every other path (compiled, board) is compared against. It keeps the
official order of random draws (one seeded torch.Generator, one multinomial per scale over
the B·pn² rows), so the same seed gives the official tokens, and top-k 1 is greedy.
"""
from __future__ import annotations

import torch

from compiler.model.var import VAR, KVCache
from compiler.model.vqvae import VQVAE


def filter_top_k_top_p(logits_BlV, top_k=0, top_p=0.0):
    """A copy of the logits with everything outside top-k, then outside top-p, at −inf."""
    V = logits_BlV.shape[-1]
    logits = logits_BlV.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(drop.scatter(sorted_idx.ndim - 1, sorted_idx, drop), -torch.inf)
    return logits


def sample_top_k_top_p(logits_BlV, top_k=0, top_p=0.0, rng=None):
    """Top-k, then top-p (nucleus) filtering, then one multinomial draw per row → B×l."""
    B, l, V = logits_BlV.shape
    probs = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=rng).view(B, l)


def cfg_weight(cfg: float, si: int, num_scales: int) -> float:
    """Guidance grows linearly over the scales: none at scale 0, full at the last one."""
    return cfg * si / (num_scales - 1)


def autoregress(var: VAR, vae: VQVAE, labels, choose, cfg=4.0, progress=None):
    """The official inference loop. `choose(si, logits_BlV)` picks scale si's tokens from the
    guided logits. Returns (tokens B×L, f̂, guided logits B×L×V)."""
    c = var.cfg
    B = len(labels)
    label_B = torch.as_tensor(labels, dtype=torch.long)
    # [conditional; unconditional]: the second half uses the "no class" embedding.
    cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, c.num_classes))))
    lvl_pos = var.lvl_pos()
    x = var.first_input(cond_BD)
    caches = [KVCache() for _ in var.blocks]
    f_hat = cond_BD.new_zeros(B, c.cvae, c.patch_nums[-1], c.patch_nums[-1])
    tokens, all_logits, S = [], [], len(c.patch_nums)
    for si, pn in enumerate(c.patch_nums):
        logits = var.forward_scale(x, cond_BD, caches)
        t = cfg_weight(cfg, si, S)
        logits = (1 + t) * logits[:B] - t * logits[B:]
        idx_Bl = choose(si, logits)
        tokens.append(idx_Bl)
        all_logits.append(logits)
        h = vae.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, c.cvae, pn, pn)
        f_hat, nxt = vae.quantize.next_input(si, f_hat, h)
        if si != S - 1:
            b, e = c.begin_ends[si + 1]
            nxt = var.word_embed(nxt.view(B, c.cvae, -1).transpose(1, 2)) + lvl_pos[:, b:e]
            x = nxt.repeat(2, 1, 1)  # both halves of the CFG batch get the same next input
        if progress is not None:
            progress(si)
    return torch.cat(tokens, dim=1), f_hat, torch.cat(all_logits, dim=1)


@torch.no_grad()
def generate(var: VAR, vae: VQVAE, labels, *, cfg=4.0, top_k=900, top_p=0.95, seed=0, progress=None):
    """Sample images for `labels` (list of class ids).
    Returns (tokens B×L int64, images B×3×H×W float32 in [0, 1])."""
    rng = torch.Generator().manual_seed(int(seed))
    choose = lambda si, logits: sample_top_k_top_p(logits, top_k=top_k, top_p=top_p, rng=rng)  # noqa: E731
    tokens, f_hat, _ = autoregress(var, vae, labels, choose, cfg=cfg, progress=progress)
    return tokens, vae.fhat_to_img(f_hat).add_(1).mul_(0.5)


@torch.no_grad()
def cached_logits(var: VAR, vae: VQVAE, labels, tokens_BL):
    """Conditional logits of the per-scale cached path, fed with the given tokens (cfg 0)."""
    begin_ends = var.cfg.begin_ends
    choose = lambda si, logits: tokens_BL[:, begin_ends[si][0]:begin_ends[si][1]]  # noqa: E731
    return autoregress(var, vae, labels, choose, cfg=0.0)[2]


@torch.no_grad()
def teacher_forced_logits(var: VAR, vae: VQVAE, labels, tokens_BL):
    """Logits of the full-sequence forward (block-causal mask) for the given tokens."""
    idx_list = [tokens_BL[:, b:e] for b, e in var.cfg.begin_ends]
    x_in = vae.quantize.idx_to_var_input(idx_list)
    return var(torch.as_tensor(labels, dtype=torch.long), x_in)
