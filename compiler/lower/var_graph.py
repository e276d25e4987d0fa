"""The VAR transformer as static Relax graphs, one function per scale (relax.frontend.nn).

Functions of the exported module (B images, CFG batch 2B = [conditional; unconditional]):
    embed(labels 2B)                         → (mods 2B×(6D+2)×C, x 2B×1×C)  AdaLN vectors, scale 0 input
    scale_<s>(x 2B×n×C, mods, tw 2, kv)      → (guided logits B×n×V, kv)     all blocks and the head
mods holds every block's six AdaLN vectors and the head's two (VAR.modulations): they depend on
the class only, so embed computes them once per image instead of every scale reading all
AdaLN weights again (a third of d16's weights, streamed from memory at every scale).
kv is a tuple of `depth` caches 2×2B×H×L×c, preallocated by the caller and written in place at
the scale's token offset; attention reads only the keys the plan keeps (schedules/attention.py).
tw = (1 + t, t) are the guidance weights of the scale; `next_input` turns the VQVAE's
downsampled f̂ into the next scale's input. Same arithmetic as compiler/model/var.py.
"""
from __future__ import annotations

import numpy as np
import torch
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from compiler.compress.plan import Plan
from compiler.lower.layers import Dense, pad_rows, padded_rows, placeholder, quantize, unpad_rows
from compiler.lower.params import param
from compiler.model.var import LN_EPS, MAX_SCALE_MUL, VAR
from schedules import attention as attn_kernels
from schedules import groupnorm as norm_kernels
from schedules import kv_layout


def _layer_norm(x, C):
    return op.layer_norm(x, C, None, None, eps=LN_EPS)


def _modulate(x, C, scale, shift, gpu):
    """LayerNorm(x)·(1 + scale) + shift: x 2B×n×C, scale and shift 2B×1×C. CPUs run the
    vectorised kernel of schedules/groupnorm.py, GPUs what DLight makes of Relax's."""
    if gpu or C % norm_kernels.LANES:
        return op.add(op.multiply(_layer_norm(x, C), scale + 1.0), shift)
    NB, n = int(x.shape[0]), int(x.shape[1])
    return op.tensor_ir_op(norm_kernels.layer_norm_modulate(NB, n, C, LN_EPS), "layer_norm_modulate",
                           [x, scale, shift], placeholder([NB, n, C]))


def slice_rows(t, b: int, e: int):
    """t[b:e] along axis 0 for static b < e (split needs strictly increasing inner cut points)."""
    cuts = [c for c in (b, e) if 0 < c < int(t.shape[0])]
    parts = op.split(t, cuts, axis=0) if cuts else [t]
    return parts[1 if b > 0 else 0]


def window_table(plan: Plan | None, block: int, S: int, H: int) -> np.ndarray:
    """win[q, h, k] for the attention kernel: −1 dense, 0 dropped, w > 0 a band."""
    win = -np.ones((S, H, S), np.int32)
    if plan is not None and plan.windows is not None:
        for h in range(H):
            for q in range(S):
                for k, w in enumerate(plan.windows[block][h][q]):
                    win[q, h, k] = -1 if w is None else int(w)
    return win


class Attention(nn.Module):
    def __init__(self, attn, plan: Plan | None, block: int, cfg, gpu: bool, int_dot: str | None = None):
        self.gpu = gpu
        H, C = attn.heads, attn.heads * attn.head_dim
        self.heads, self.head_dim, self.C = H, attn.head_dim, C
        bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias)).float()
        self.mat_qkv = Dense(attn.mat_qkv, bias=bias, gpu=gpu, int_dot=int_dot)
        self.scale_mul = param(attn.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp().float())
        self.proj = Dense(attn.proj, gpu=gpu, int_dot=int_dot)
        S = len(cfg.patch_nums)
        self.windows = param(window_table(plan, block, S, H))
        self.share = [bool(plan.asc_share[block][s]) if plan and plan.asc_share else False for s in range(S)]
        self.mode = plan.asc_mode if plan else "map"
        # ASC "output" from a scale on to the last: the unconditional half's queries, keys and
        # values are never used (its output is the conditional one's, its keys never read), so
        # that half's q, k, v, attention and proj are skipped ("cond" below)
        self.cond_only = [self.mode == "output" and all(self.share[s:]) for s in range(S)]
        self.attn_bits = plan.attention_bits if plan else None

    def on_grid(self, t):
        """t on its per-token 8-bit grid and back to float32 (the simulation's fake_quant_per_token)."""
        NB, H, n, c = (int(d) for d in t.shape)
        tq, s = quantize(op.reshape(t, [NB * H * n, c]), NB * H * n, c, self.gpu)
        return op.reshape(op.multiply(op.astype(tq, "float32"), s), [NB, H, n, c])

    def share_at(self, si: int) -> str | None:
        """The attention kernel's ASC mode at query scale si."""
        return "cond" if self.cond_only[si] else (self.mode if self.share[si] else None)

    def forward(self, x, kv, si: int, geom, cfg):
        """(proj of the attention output, kv) for x of query_rows(2B, share_at(si)) rows: 2B×n×C,
        or for "cond" the conditional half's B×n×C, which both halves then share."""
        rows, n = int(x.shape[0]), int(x.shape[1])
        H, c, L, S = self.heads, self.head_dim, kv_layout.cache_len(cfg.patch_nums), len(cfg.patch_nums)
        share = self.share_at(si)
        NB = int(kv.shape[1])
        qkv = op.reshape(self.mat_qkv(x), [rows, n, 3, H, c])
        q, k, v = op.split(op.permute_dims(qkv, [2, 0, 3, 1, 4]), 3, axis=0)
        q, k, v = (op.reshape(t, [rows, H, n, c]) for t in (q, k, v))
        norm = lambda t: op.divide(t, op.sqrt(op.sum(op.square(t), axis=-1, keepdims=True)).maximum(1e-12))
        q = op.multiply(norm(q), self.scale_mul)
        k = norm(k)
        if self.attn_bits:      # 8-bit attention: q, k, v on their grids, the weights rounded in the kernel
            q, k, v = self.on_grid(q), self.on_grid(k), self.on_grid(v)
        begin = int(kv_layout.scale_slots(cfg.patch_nums)[si, 0])
        kv = op.tensor_ir_inplace_op(attn_kernels.kv_write(rows, H, n, c, L, begin, NB), "kv_write", [kv, k, v],
                                     inplace_indices=[0], out=placeholder(kv.shape))
        o = op.tensor_ir_op(attn_kernels.windowed_attention(NB, H, n, c, L, S, si, share, self.gpu, self.attn_bits),
                            "attention",
                            [q, kv, self.windows, geom], placeholder([rows, H, n, c]))
        o = op.reshape(op.permute_dims(o, [0, 2, 1, 3]), [rows, n, self.C])
        return self.proj(o), kv


def _times_gate(a, g):
    """a·g for the 2B×1×C gate g, where a is 2B×n×C or, computed for the conditional half only
    (ASC "cond"), B×n×C that both halves share."""
    NB, B, n, C = int(g.shape[0]), int(a.shape[0]), int(a.shape[1]), int(a.shape[2])
    if B == NB:
        return op.multiply(a, g)
    both = op.multiply(op.reshape(a, [1, B, n, C]), op.reshape(g, [NB // B, B, 1, C]))
    return op.reshape(both, [NB, n, C])


class FFN(nn.Module):
    def __init__(self, ffn, gpu: bool, int_dot: str | None = None):
        self.gpu = gpu
        self.fc1, self.fc2 = Dense(ffn.fc1, gpu=gpu, int_dot=int_dot), Dense(ffn.fc2, gpu=gpu, int_dot=int_dot)

    def forward(self, x):
        NB, n, C = (int(d) for d in x.shape)
        M = NB * n
        if self.gpu:
            return self.fc2(self.fc1(x, gelu=True))
        # on the CPU, both layers run on the same padded rows: one pad, one cut
        Mp = padded_rows(M)
        h = self.fc1.rows(pad_rows(op.reshape(x, [M, C]), Mp), Mp, gelu=True)
        return op.reshape(unpad_rows(self.fc2.rows(h, Mp), M), [NB, n, C])


class Block(nn.Module):
    def __init__(self, block, plan, index, cfg, gpu: bool, int_dot: str | None = None):
        self.C, self.shared_aln, self.gpu = cfg.width, cfg.shared_aln, gpu
        self.attn = Attention(block.attn, plan, index, cfg, gpu, int_dot)
        self.ffn = FFN(block.ffn, gpu, int_dot)
        if cfg.shared_aln:
            self.ada_gss = param(block.ada_gss.float())
        else:
            self.ada_lin = Dense(block.ada_lin[1], gpu=gpu, int_dot=int_dot)

    def modulation(self, block_cond):
        """The six AdaLN vectors, 2B×6×C."""
        C, NB = self.C, int(block_cond.shape[0])
        if self.shared_aln:
            return op.reshape(op.add(self.ada_gss, block_cond), [NB, 6, C])   # cond: 2B×1×6×C
        return op.reshape(self.ada_lin(op.silu(block_cond)), [NB, 6, C])

    def forward(self, x, mod, kv, si, geom, cfg):
        C = self.C
        g1, g2, s1, s2, b1, b2 = op.split(mod, 6, axis=1)                   # each 2B×1×C
        NB = int(x.shape[0])
        rows = attn_kernels.query_rows(NB, self.attn.share_at(si))
        xa = x
        if rows < NB:      # ASC "cond": the attention of the conditional half only
            xa, s1, b1 = (slice_rows(t, 0, rows) for t in (x, s1, b1))
        a, kv = self.attn(_modulate(xa, C, s1, b1, self.gpu), kv, si, geom, cfg)
        x = op.add(x, _times_gate(a, g1))
        x = op.add(x, op.multiply(self.ffn(_modulate(x, C, s2, b2, self.gpu)), g2))
        return x, kv


class VARGraph(nn.Module):
    """All per-scale VAR functions; parameters are taken from a (plan-applied) reference VAR.
    `gpu` (False, "cuda" or "opencl") picks the GPU variants of the kernels (and their weight layout);
    `int_dot` the CPU's integer dot product for W8A8 ("vpdpbusd", "pmaddwd", "sdot" or None: targets.Board)."""

    def __init__(self, var: VAR, plan: Plan | None = None, gpu: str | bool = False, int_dot: str | None = None):
        cfg = self.cfg = var.cfg
        self.gpu = gpu
        self.class_emb = param(var.class_emb.weight.float())
        self.pos_start = param(var.pos_start.float())
        self.lvl_pos = param(var.lvl_pos()[0].float())             # L×C, as the reference adds it
        if cfg.shared_aln:
            self.shared_ada_lin = Dense(var.shared_ada_lin[1], gpu=gpu, int_dot=int_dot)
        self.blocks = nn.ModuleList([Block(b, plan, i, cfg, gpu, int_dot) for i, b in enumerate(var.blocks)])
        self.head_ada_lin = Dense(var.head_nm.ada_lin[1], gpu=gpu, int_dot=int_dot)
        self.head = Dense(var.head, gpu=gpu, int_dot=int_dot)
        self.word_embed = Dense(var.word_embed, gpu=gpu, int_dot=int_dot)
        self.geom = param(kv_layout.scale_slots(cfg.patch_nums))

    def lvl_pos_slice(self, si: int):
        b, e = self.cfg.begin_ends[si]
        return slice_rows(self.lvl_pos, b, e)                       # n×C

    def embed(self, labels):
        cfg, NB, C = self.cfg, int(labels.shape[0]), self.cfg.width
        cond = op.take(self.class_emb, labels, axis=0)                 # 2B×C
        first = cfg.patch_nums[0] ** 2
        x = op.add(op.add(op.broadcast_to(op.reshape(cond, [NB, 1, C]), [NB, first, C]), self.pos_start),
                   self.lvl_pos_slice(0))
        return self.modulations(cond), x

    def modulations(self, cond):
        """VAR.modulations: 2B×(6·depth + 2)×C."""
        NB, C = int(cond.shape[0]), self.cfg.width
        block_cond = cond
        if self.cfg.shared_aln:
            block_cond = op.reshape(self.shared_ada_lin(op.silu(cond)), [NB, 1, 6, C])
        head = op.reshape(self.head_ada_lin(op.silu(cond)), [NB, 2, C])
        return op.concat([b.modulation(block_cond) for b in self.blocks] + [head], dim=1)

    def next_input(self, si: int, nxt):
        """Scale si's input from f̂ downsampled to it (B×n×Cvae): word_embed + lvl_pos, both CFG halves."""
        x = op.add(self.word_embed(nxt), self.lvl_pos_slice(si))
        return op.concat([x, x], dim=0)

    def scale(self, si: int, x, mods, tw, kv):
        cfg, C, NB = self.cfg, self.cfg.width, int(x.shape[0])
        n, V, D = int(x.shape[1]), cfg.vocab_size, cfg.depth
        kv = list(kv)
        per_block = op.split(mods, [6 * d for d in range(1, D + 1)], axis=1)   # D × (2B×6×C), head 2B×2×C
        for d, block in enumerate(self.blocks):
            x, kv[d] = block(x, per_block[d], kv[d], si, self.geom, cfg)
        scale, shift = op.split(per_block[D], 2, axis=1)
        h = _modulate(x, C, scale, shift, self.gpu)
        logits = self.head(h)                                            # 2B×n×V
        cond_l, uncond_l = op.split(logits, 2, axis=0)
        w_cond, w_uncond = op.split(tw, 2, axis=0)
        guided = op.subtract(op.multiply(cond_l, w_cond), op.multiply(uncond_l, w_uncond))
        return op.reshape(guided, [NB // 2, n, V]), tuple(kv)
