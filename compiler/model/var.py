"""The VAR transformer (Tian et al. 2024), computing what the official `models/var.py` computes.

Names follow the paper and the official state dict so checkpoints load strictly. Two ways in:
- `forward(label_B, x_BLCv)`: teacher forcing over the whole sequence with the block-causal
  mask (used for training the demo model and as a check of the cached path);
- `forward_scale(...)`: one scale at a time against a KV cache, what the sampler runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler.model.config import VARConfig

LN_EPS = 1e-6
MAX_SCALE_MUL = math.log(100.0)


class KVCache:
    """Keys and values of all scales seen so far, for one block (cat along the token axis)."""

    def __init__(self):
        self.k = None
        self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


def sdpa(q, k, v, attn_bias=None):
    """Softmax attention with scale 1 (q already carries the per-head temperature)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head temperature.

    `attend` is the attention proper; a compression plan swaps it for windowed/shared attention
    (compiler.compress.attention), and `mat_qkv`/`proj` may be swapped for quantized layers."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(width, width)
        self.attend = sdpa

    def qkv(self, x):
        """q (already scaled), k, v as B×H×L×c."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        if isinstance(self.mat_qkv, nn.Linear):
            qkv = F.linear(x, self.mat_qkv.weight, bias)
        else:  # a quantized layer: same product, bias added after
            qkv = self.mat_qkv(x) + bias
        qkv = qkv.view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        return F.normalize(q, dim=-1).mul(scale_mul), F.normalize(k, dim=-1), v

    def forward(self, x, attn_bias=None, cache: KVCache | None = None):
        B, L, C = x.shape
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.append(k, v)
        out = self.attend(q, k, v, attn_bias)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorm scale/shift and residual gates come from the class."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.width
        self.C = C
        self.attn = SelfAttention(C, cfg.heads)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond_BD):
        """gamma1, gamma2, scale1, scale2, shift1, shift2, each B×1×C."""
        if self.shared_aln:  # cond_BD is already shared_ada_lin(cond): B×1×6×C
            return (self.ada_gss + cond_BD).unbind(2)
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x, cond_BD, attn_bias=None, cache: KVCache | None = None, mod=None):
        """`mod` (B×6×C, VAR.modulations) replaces modulation(cond_BD) when given."""
        six = self.modulation(cond_BD) if mod is None else mod.unsqueeze(2).unbind(1)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = six
        ln = lambda t: F.layer_norm(t, (self.C,), eps=LN_EPS)  # noqa: E731
        x = x + self.attn(ln(x).mul(scale1.add(1)).add_(shift1), attn_bias, cache).mul_(gamma1)
        x = x + self.ffn(ln(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.C = C
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BD, mod=None):
        """`mod` (B×2×C, VAR.modulations) replaces ada_lin(cond_BD) when given."""
        if mod is None:
            scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        else:
            scale, shift = mod.unsqueeze(2).unbind(1)
        return F.layer_norm(x, (self.C,), eps=LN_EPS).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """d36's single AdaLN linear; its output is shared by all blocks (B×1×6×C)."""

    def forward(self, cond_BD):
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.width, cfg.seq_len
        self.first_l = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, cfg.vocab_size)

        # Scale id of every token, and the block-causal mask: a query sees its own scale and
        # all coarser ones. Both are buffers of the official checkpoints.
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)]).view(1, L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer("lvl_1L", dT[:, 0].contiguous())
        mask = torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def block_cond(self, cond_BD):
        """What each block's AdaLN reads: the class embedding, or d36's shared projection."""
        return self.shared_ada_lin(cond_BD) if self.cfg.shared_aln else cond_BD

    def lvl_pos(self):
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # 1×L×C

    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def first_input(self, cond_BD):
        """Scale 0's input: the class embedding as start-of-sequence token."""
        B = cond_BD.shape[0]
        return (cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
                + self.pos_start.expand(B, self.first_l, -1)
                + self.lvl_pos()[:, :self.first_l])

    def forward_scale(self, x, cond_BD, caches):
        """Run all blocks on one scale's tokens, attending through `caches`; return logits."""
        cond = self.block_cond(cond_BD)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cond, None, cache)
        return self.get_logits(x, cond_BD)

    def modulations(self, cond_BD):
        """Every block's six AdaLN vectors, then the head's two: B×(6·depth + 2)×C. They depend
        on the class only, so compiled samplers compute them once per image, not per scale."""
        cond = self.block_cond(cond_BD)
        mods = [torch.stack(b.modulation(cond), 1).flatten(1, 2) for b in self.blocks]
        mods.append(self.head_nm.ada_lin(cond_BD).view(-1, 2, self.cfg.width))
        return torch.cat(mods, 1)

    def forward_scale_modulated(self, x, mods, caches):
        """forward_scale with the modulations computed beforehand (VAR.modulations)."""
        for d, (block, cache) in enumerate(zip(self.blocks, caches)):
            x = block(x, None, None, cache, mod=mods[:, 6 * d:6 * d + 6])
        h = self.head_nm(x.float(), None, mod=mods[:, -2:])
        return self.head(h).float()

    def forward(self, label_B, x_BLCv_wo_first_l):
        """Teacher forcing: logits B×L×V for the whole sequence in one pass (no class dropout)."""
        B = x_BLCv_wo_first_l.shape[0]
        cond_BD = self.class_emb(label_B)
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self.lvl_pos()
        cond = self.block_cond(cond_BD)
        for block in self.blocks:
            x = block(x, cond, self.attn_bias_for_masking)
        return self.get_logits(x.float(), cond_BD)
