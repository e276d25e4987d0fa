"""The VQVAE side of generation as static Relax graphs: the f̂ update after each scale and the
decoder. Same arithmetic as compiler/model/vqvae.py, with the bicubic upsampling and the area
downsampling written as exact 1-D interpolation matrices (U·h·Uᵀ), which is what the separable
PyTorch kernels compute.

    update(s, idx B×n int32, f_hat B×Cvae×P×P) → (f_hat, f̂ area-downsampled to scale s+1)
    decode(f_hat)                              → images B×3×H×W in [0, 1]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from compiler.lower.layers import padded_rows, placeholder
from compiler.lower.params import param
from compiler.model.vqvae import VQVAE
from schedules import conv as conv_kernels
from schedules import groupnorm as norm_kernels
from schedules import matmul
from schedules import winograd


def interpolation_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """n_out×n_in matrix M with interpolate(x) = M·x along one axis (the other axis kept at 1)."""
    eye = torch.eye(n_in).view(n_in, 1, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode=mode)[:, 0, :, 0].T.contiguous()


def _resize(h, M):
    """h …×a×a → M·h·Mᵀ (…×b×b)."""
    return op.matmul(op.matmul(M, h), op.permute_dims(M, [1, 0]))


BAND_BYTES = 64 << 20   # a GPU convolution's columns at once: the whole 160-channel 256² image's
                        # took 377 MB, and the memory plan held three such buffers (1.09 GB at d16)


class Conv(nn.Module):
    """Conv2d: stride-1 same-padded ones on the CPU through schedules/winograd.py where it pays
    (3×3, from 32² pixels on) and schedules/conv.py elsewhere, both on the same packed weights;
    on a GPU 1×1 and 3×3 ones as one matmul of the weights by the input's columns
    (schedules/conv.py: im2col_3x3), which DLight tiles; everything else through Relax's conv2d."""

    def __init__(self, conv, gpu: bool):
        self.stride, self.padding = conv.stride[0], conv.padding[0]
        self.shape = tuple(conv.weight.shape)           # Co, Ci, k, k
        Co, Ci, k, _ = self.shape
        same = self.stride == 1 and self.padding == k // 2
        self.mode = "relax" if not same or (gpu and k not in (1, 3)) else "gemm" if gpu else "cpu"
        w = conv.weight.detach().float().numpy()
        self.weight = param({"relax": w, "gemm": w.reshape(Co, Ci * k * k), "cpu": conv_kernels.pack_weight(w)}[self.mode])
        b = conv.bias.detach().float()
        self.bias = param(b.view(Co, 1) if self.mode == "gemm" else b)   # gemm: added to Co×pixels

    def forward(self, x):
        Co, Ci, k, _ = self.shape
        if self.mode == "relax":
            return op.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        B, _, H, W = (int(d) for d in x.shape)
        if self.mode == "gemm":   # image by image, so that the columns do not grow with the batch
            return self._gemm(x) if B == 1 else op.concat([self._gemm(xb) for xb in op.split(x, B, axis=0)], dim=0)
        if winograd.applies(Co, k, self.stride, self.padding, H, W):
            kernel = winograd.conv2d(B, int(Ci), H, W, int(Co))
        else:
            kernel = conv_kernels.conv2d(B, int(Ci), H, W, int(Co), int(k))
        return op.tensor_ir_op(kernel, "conv2d",
                               [x, self.weight, self.bias], placeholder([B, int(Co), H, W]))

    def _gemm(self, x):
        """One image on a GPU: weights (Co × Ci·k·k) · the image's columns + bias, for bands of
        output rows whose columns take at most BAND_BYTES."""
        Co, Ci, k, _ = self.shape
        _, _, H, W = (int(d) for d in x.shape)
        if k == 1:
            return op.reshape(op.add(op.matmul(self.weight, op.reshape(x, [Ci, H * W])), self.bias), [1, Co, H, W])
        rows = max([r for r in range(1, H + 1) if H % r == 0 and Ci * 9 * r * W * 4 <= BAND_BYTES] or [1])
        bands = [op.add(op.matmul(self.weight, op.tensor_ir_op(conv_kernels.im2col_3x3(Ci, H, W, r0, rows), "im2col",
                                                               [x], placeholder([Ci * 9, rows * W]))), self.bias)
                 for r0 in range(0, H, rows)]
        return op.reshape(bands[0] if len(bands) == 1 else op.concat(bands, dim=1), [1, Co, H, W])


class Norm(nn.Module):
    """GroupNorm, then SiLU when `silu`: on the CPU through schedules/groupnorm.py, on GPUs
    through Relax's group_norm (DLight schedules it)."""

    def __init__(self, gn, gpu: bool):
        self.weight, self.bias, self.groups, self.eps = param(gn.weight), param(gn.bias), gn.num_groups, gn.eps
        self.gpu = gpu

    def forward(self, x, silu: bool = False):
        B, C, H, W = (int(d) for d in x.shape)
        if self.gpu:
            h = self._gpu(x)
            return op.silu(h) if silu else h
        if not norm_kernels.applies(H, W):
            h = op.group_norm(x, self.groups, self.weight, self.bias, eps=self.eps)
            return op.silu(h) if silu else h
        return op.tensor_ir_op(norm_kernels.group_norm(B, C, H, W, self.groups, self.eps, silu), "group_norm",
                               [x, self.weight, self.bias], placeholder([B, C, H, W]))

    def _gpu(self, x):
        """Relax's group_norm reaches the GPU as one thread block for all groups (DLight cannot
        split a group's reduction), so the sums go in two steps: over slices of each group,
        which DLight spreads over the GPU, then over the slices; the rest is elementwise."""
        B, C, H, W = (int(d) for d in x.shape)
        G = self.groups
        n = C // G * H * W
        S = next(s for s in (64, 32, 16, 8, 4, 2, 1) if n % s == 0 and (n // s >= 1024 or s == 1))
        xs = op.reshape(x, [B * G, S, n // S])
        mean = op.sum(op.sum(xs, axis=2), axis=1) / float(n)
        var = op.sum(op.sum(op.square(xs), axis=2), axis=1) / float(n) - op.square(mean)
        std = op.reshape(op.sqrt(var + self.eps), [B, G, 1, 1])
        h = (op.reshape(x, [B, G, C // G, H * W]) - op.reshape(mean, [B, G, 1, 1])) / std
        h = h * op.reshape(self.weight, [1, G, C // G, 1]) + op.reshape(self.bias, [1, G, C // G, 1])
        return op.reshape(h, [B, C, H, W])


class ResnetBlock(nn.Module):
    def __init__(self, blk, gpu: bool):
        self.norm1, self.conv1 = Norm(blk.norm1, gpu), Conv(blk.conv1, gpu)
        self.norm2, self.conv2 = Norm(blk.norm2, gpu), Conv(blk.conv2, gpu)
        self.shortcut = Conv(blk.nin_shortcut, gpu) if isinstance(blk.nin_shortcut, torch.nn.Conv2d) else None

    def forward(self, x):
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        return op.add(self.shortcut(x) if self.shortcut is not None else x, h)


class AttnBlock(nn.Module):
    """Single-head attention over the pixels. On the CPU both products run on the dense kernel of
    schedules/matmul.py, their right operand packed into its panels on the fly (a copy of 0.2 M
    values at d16's 16² × 640): Relax's untuned batched matmul took 265 ms per d16 image."""

    def __init__(self, blk, gpu: bool):
        self.C, self.gpu = blk.C, gpu
        self.norm, self.qkv, self.proj_out = Norm(blk.norm, gpu), Conv(blk.qkv, gpu), Conv(blk.proj_out, gpu)

    def forward(self, x):
        B, C, H, W = (int(d) for d in x.shape)
        q, k, v = op.split(op.reshape(self.qkv(self.norm(x)), [B, 3, C, H * W]), 3, axis=1)
        q, k, v = (op.reshape(t, [B, C, H * W]) for t in (q, k, v))
        if self.gpu or (H * W) % matmul.LANES or C % matmul.LANES:
            w = op.softmax(op.matmul(op.permute_dims(q, [0, 2, 1]), k) * (C ** -0.5), axis=2)
            h = op.matmul(v, op.permute_dims(w, [0, 2, 1]))
        else:
            h = op.concat([self._attend_cpu(*(op.split(t, B, axis=0)[b] if B > 1 else t for t in (q, k, v)))
                           for b in range(B)], dim=0)
        return op.add(x, self.proj_out(op.reshape(h, [B, C, H, W])))

    def _attend_cpu(self, q, k, v):
        """One image: q, k, v 1×C×N → 1×C×N."""
        _, C, N = (int(d) for d in q.shape)
        L = matmul.LANES
        scores = _dense(op.permute_dims(op.reshape(q, [C, N]), [1, 0]),          # queries N×C
                        op.permute_dims(op.reshape(k, [C, N // L, L]), [1, 0, 2]))  # keys as panels
        w = op.softmax(scores * (C ** -0.5), axis=1)                               # N(q)×N(k)
        h = _dense(op.reshape(v, [C, N]),                                          # C×N(k)
                   op.permute_dims(op.reshape(w, [N // L, L, N]), [0, 2, 1]))      # queries as panels
        return op.reshape(h, [1, C, N])


def _dense(x, wp):
    """x M×K times the weights packed in panels wp (O/LANES × K × LANES) → M×O, on the CPU kernel."""
    M, K = (int(d) for d in x.shape)
    O = int(wp.shape[0]) * int(wp.shape[2])
    Mp = padded_rows(M)
    if Mp != M:
        x = op.pad(x, [0, Mp - M, 0, 0])
    y = op.tensor_ir_op(matmul.dense_fp32(Mp, K, O), "dense", [x, wp, op.zeros([O], "float32")],
                        placeholder([Mp, O]))
    return op.split(y, [M], axis=0)[0] if Mp != M else y


def _upsample_nearest(x):
    B, C, H, W = (int(d) for d in x.shape)
    x = op.broadcast_to(op.reshape(x, [B, C, H, 1, W, 1]), [B, C, H, 2, W, 2])
    return op.reshape(x, [B, C, 2 * H, 2 * W])


class Decoder(nn.Module):
    def __init__(self, dec, gpu: bool):
        self.conv_in = Conv(dec.conv_in, gpu)
        self.mid = nn.ModuleList([ResnetBlock(dec.mid.block_1, gpu), ResnetBlock(dec.mid.block_2, gpu)])
        self.mid_attn = AttnBlock(dec.mid.attn_1, gpu) if not isinstance(dec.mid.attn_1, torch.nn.Identity) else None
        levels = []
        for level in reversed(dec.up):   # coarsest first, the order they run in
            lv = nn.Module()
            lv.blocks = nn.ModuleList([ResnetBlock(b, gpu) for b in level.block])
            lv.attns = nn.ModuleList([AttnBlock(a, gpu) for a in level.attn])
            lv.upsample = Conv(level.upsample.conv, gpu) if hasattr(level, "upsample") else None
            levels.append(lv)
        self.levels = nn.ModuleList(levels)
        self.norm_out, self.conv_out = Norm(dec.norm_out, gpu), Conv(dec.conv_out, gpu)

    def forward(self, z):
        h = self.mid[0](self.conv_in(z))
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h)
        for lv in self.levels:
            for i, blk in enumerate(lv.blocks):
                h = blk(h)
                if len(lv.attns):
                    h = lv.attns[i](h)
            if lv.upsample is not None:
                h = lv.upsample(_upsample_nearest(h))
        return self.conv_out(self.norm_out(h, silu=True))


class VQVAEGraph(nn.Module):
    """f̂ updates and the decoder."""

    def __init__(self, vae: VQVAE, cfg, gpu: bool = False):
        q = vae.quantize
        self.pns = cfg.patch_nums
        self.embedding = param(q.embedding.weight.float())
        P = self.pns[-1]
        self.phis = nn.ModuleList([Conv(phi, gpu) for phi in q.quant_resi.qresi_ls])
        self.phi_index = [q.quant_resi.index(si / (len(self.pns) - 1)) for si in range(len(self.pns))]
        self.phi_ratio = [phi.ratio for phi in q.quant_resi.qresi_ls]
        self.up = nn.ModuleList([_Matrix(interpolation_matrix(pn, P, "bicubic")) for pn in self.pns[:-1]])
        self.down = nn.ModuleList([_Matrix(interpolation_matrix(P, pn, "area")) for pn in self.pns[1:]])
        self.post_quant_conv = Conv(vae.post_quant_conv, gpu)
        self.decoder = Decoder(vae.decoder, gpu)

    def update(self, si: int, idx, f_hat):
        B, n = int(idx.shape[0]), int(idx.shape[1])
        pn, S, Cv = self.pns[si], len(self.pns), int(f_hat.shape[1])
        h = op.permute_dims(op.reshape(op.take(self.embedding, op.reshape(idx, [B * n]), axis=0), [B, pn, pn, Cv]),
                            [0, 3, 1, 2])
        if si != S - 1:
            h = _resize(h, self.up[si].m)
        k = self.phi_index[si]
        r = self.phi_ratio[k]
        f_hat = op.add(f_hat, h * (1 - r) + self.phis[k](h) * r)
        if si == S - 1:
            return f_hat, None
        pn2 = self.pns[si + 1]
        nxt = op.reshape(_resize(f_hat, self.down[si].m), [B, Cv, pn2 * pn2])
        return f_hat, op.permute_dims(nxt, [0, 2, 1])                 # B×n'×Cv

    def decode(self, f_hat):
        img = self.decoder(self.post_quant_conv(f_hat))
        return (img.maximum(-1.0).minimum(1.0) + 1.0) * 0.5


class _Matrix(nn.Module):
    def __init__(self, m):
        self.m = param(m.float())
