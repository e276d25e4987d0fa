"""The multi-scale VQVAE of VAR: a latent-diffusion style encoder/decoder and a residual
quantizer over scales, computing what the official `models/vqvae.py`, `basic_vae.py` and
`quant.py` compute. Module names match the official state dict.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler.model.config import VQVAEConfig


def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1×1-conv projections, scale C^-0.5."""

    def __init__(self, c):
        super().__init__()
        self.C = c
        self.norm = Normalize(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        q, k, v = qkv.reshape(B, 3, self.C, H * W).unbind(1)
        w = torch.bmm(q.permute(0, 2, 1), k).mul_(self.C ** -0.5).softmax(dim=2)  # B×HW(q)×HW(k)
        h = torch.bmm(v, w.permute(0, 2, 1)).view(B, self.C, H, W)
        return x + self.proj_out(h)


def _level(blocks, attns, **extra):
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    for name, mod in extra.items():
        setattr(m, name, mod)
    return m


def _mid(c, using_mid_sa):
    m = nn.Module()
    m.block_1 = ResnetBlock(c, c)
    m.attn_1 = AttnBlock(c) if using_mid_sa else nn.Identity()
    m.block_2 = ResnetBlock(c, c)
    return m


def _run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for lvl in range(n):
            cout = ch * mult[lvl]
            blocks = [ResnetBlock(cin if i == 0 else cout, cout) for i in range(cfg.num_res_blocks)]
            attns = [AttnBlock(cout) for _ in blocks] if (lvl == n - 1 and cfg.using_sa) else []
            extra = {"downsample": Downsample2x(cout)} if lvl != n - 1 else {}
            self.down.append(_level(blocks, attns, **extra))
            cin = cout
        self.mid = _mid(cin, cfg.using_mid_sa)
        self.norm_out = Normalize(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = _mid(cin, cfg.using_mid_sa)
        levels = [None] * n  # up[i] is the level at resolution i; built from the coarsest
        for lvl in reversed(range(n)):
            cout = ch * mult[lvl]
            blocks = [ResnetBlock(cin if i == 0 else cout, cout) for i in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(cout) for _ in blocks] if (lvl == n - 1 and cfg.using_sa) else []
            extra = {"upsample": Upsample2x(cout)} if lvl != 0 else {}
            levels[lvl] = _level(blocks, attns, **extra)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """φ(h) = 0.5·h + 0.5·conv3×3(h): the residual refinement after each scale."""

    def __init__(self, c, ratio=0.5):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = ratio

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiPartiallyShared(nn.Module):
    """K φ convs shared over the scales: scale si uses the one whose tick is nearest si/(S-1)."""

    def __init__(self, c, K):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(c) for _ in range(K)])
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def index(self, at: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at)))

    def __getitem__(self, at: float) -> Phi:
        return self.qresi_ls[self.index(at)]


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over scales (official name: VectorQuantizer2)."""

    def __init__(self, cfg: VQVAEConfig, patch_nums):
        super().__init__()
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiPartiallyShared(cfg.z_channels, cfg.num_phi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(cfg.num_scales, cfg.vocab_size))

    def phi(self, si: int) -> Phi:
        return self.quant_resi[si / (len(self.patch_nums) - 1)]

    def nearest(self, z_NC):
        """Index of the nearest codebook vector by L2 distance (same arithmetic as official)."""
        E = self.embedding.weight.data
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E.square(), dim=1, keepdim=False)
        d.addmm_(z_NC, E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def residual_scales(self, f_BChw):
        """Quantize the residual scale by scale, coarse to fine. Yields (token ids B×pn×pn,
        φ(code map upsampled to the latent size)); each is subtracted before the next scale."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        S = len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != S - 1 else f_rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            h = self.embedding(idx).permute(0, 3, 1, 2)
            if si != S - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.phi(si)(h.contiguous())
            f_rest = f_rest - h.detach()
            yield idx, h

    def f_to_idx(self, f_BChw):
        """Encoder latent → list of token indices per scale (B×pn²), coarse to fine."""
        return [idx.reshape(idx.shape[0], -1) for idx, _ in self.residual_scales(f_BChw)]

    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input: for scales 1..S-1, area-downsampled f̂ (B×(L-1)×Cvae)."""
        B, C = idx_list[0].shape[0], self.Cvae
        H = W = self.patch_nums[-1]
        f_hat = torch.zeros(B, C, H, W)
        next_scales = []
        for si in range(len(self.patch_nums) - 1):
            pn = self.patch_nums[si]
            h = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat.add_(self.phi(si)(F.interpolate(h, size=(H, W), mode="bicubic")))
            pn_next = self.patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def next_input(self, si: int, f_hat, h_BChw):
        """Add scale si's map to f̂ (in place); return f̂ and the next scale's downsampled input."""
        S, HW = len(self.patch_nums), self.patch_nums[-1]
        if si != S - 1:
            f_hat.add_(self.phi(si)(F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self.phi(si)(h_BChw))
        return f_hat, f_hat

    def forward(self, f_BChw, beta=0.25):
        """Training only: straight-through quantization and the VQ loss (as official)."""
        f_no_grad = f_BChw.detach()
        f_hat, loss = torch.zeros_like(f_no_grad), 0.0
        for _, h in self.residual_scales(f_BChw):
            f_hat = f_hat + h
            loss = loss + F.mse_loss(f_hat.data, f_BChw) * beta + F.mse_loss(f_hat, f_no_grad)
        f_hat = (f_hat.data - f_no_grad) + f_BChw
        return f_hat, loss / len(self.patch_nums)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig, patch_nums):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg, patch_nums)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    @property
    def image_size(self) -> int:
        return self.quantize.patch_nums[-1] * self.cfg.downsample

    def img_to_idx(self, img):
        return self.quantize.f_to_idx(self.quant_conv(self.encoder(img)))

    def fhat_to_img(self, f_hat):
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def forward(self, img):
        """Training only: reconstruction and VQ loss."""
        f_hat, vq_loss = self.quantize(self.quant_conv(self.encoder(img)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss
