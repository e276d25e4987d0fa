"""Weight/activation quantization with real integers, one small class per scheme.

The arithmetic here is the contract the compiled kernels follow bit for bit:
- rounding is round-half-to-even (torch.round; `nearbyint` in the kernels);
- float16 weights (fp16): the float32 weight rounded to float16, float32 activations and sums;
- int8 weights: symmetric per output channel, scale = max|w| / 127, values in [-127, 127];
- int4 weights: symmetric per (output channel, group of `group` inputs), scale = max|w| / 7
  stored as float16, values in [-7, 7], packed two per byte (low nibble = even input index);
- int8 activations: dynamic per token, scale = max|x| / 127;
- integer products are summed exactly (int32 in the kernels; float64 here, exact for these
  sizes), then converted to float32 and scaled: y = float(acc)·s_x·s_w + b, in that order.
Per-channel int8 scales are float32; int4 group scales are float16.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compiler.errors import UserError

EPS = 1e-12
FP16_TINY = 2.0 ** -14  # smallest normal float16: group scales below it would lose precision


def round_half_even(x):
    return torch.round(x)


def quantize_per_token_int8(x, bits: int = 8):
    """x: …×K float → (int8 values …×K, float32 scales …×1); `bits` < 8 for the sensitivity sweep."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=EPS)
    return round_half_even(x / s).clamp(-qmax, qmax).to(torch.int8), s


def fake_quant_per_token(x, bits: int = 8):
    """Round x to its per-token symmetric `bits`-bit grid and back (8-bit attention inputs)."""
    xq, s = quantize_per_token_int8(x, bits)
    return xq.float() * s


def quantize_map(P, row_max, bits: int = 8):
    """Attention weights (≥ 0) on the unsigned grid k·row_max / (2^bits − 1) of their row.

    A static 1/255 grid would round most weights of a 680-key softmax (≈ 1/680 each) to 0;
    scaling by the row's largest weight keeps them."""
    s = (row_max / (2 ** bits - 1)).clamp(min=EPS)[..., None]
    return round_half_even(P / s) * s


def quantize_weight_int8(w):
    """w: O×K → (int8 O×K, float32 scales O)."""
    s = (w.abs().amax(dim=1) / 127).clamp(min=EPS)
    return round_half_even(w / s[:, None]).clamp(-127, 127).to(torch.int8), s.float()


def quantize_weight_int4(w, group: int):
    """w: O×K → (int8 values in [-7, 7] O×K, float16 scales O×(K/group)).

    Group scales are stored in float16 (half the bytes of float32 at group 64 is 3 % of the
    layer); the weights are rounded against the stored float16 scale, so dequantization is
    exactly q·float32(scale)."""
    O, K = w.shape
    if K % group:
        raise UserError(f"int4 group size {group} does not divide the layer's {K} inputs")
    wg = w.view(O, K // group, group)
    s = (wg.abs().amax(dim=2) / 7).clamp(min=FP16_TINY).half()
    return round_half_even(wg / s.float()[..., None]).clamp(-7, 7).to(torch.int8).view(O, K), s


def pack_int4(q):
    """int8 values in [-8, 7], O×K (K even) → uint8 O×K/2, low nibble = even index."""
    if q.shape[-1] % 2:
        raise UserError(f"int4 packing needs an even number of inputs, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p):
    """uint8 O×K/2 → int8 O×K with sign extension of each nibble."""
    lo = (p & 0xF).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    both = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def int_matmul(xq, wq):
    """Exact integer x·wᵀ (…×K int8 by O×K int8) in float64 (|sum| < 2^53 for K < 2^38)."""
    return xq.double() @ wq.double().T


class Scheme:
    """A quantization scheme: how a Linear's weight is stored and how the product is computed."""

    name = "fp32"
    weight_bits = 16  # what the weight costs relative to fp16 storage is weight_bytes / (2·O·K)

    def __init__(self, group: int | None = None):
        self.group = group

    def pack(self, w) -> dict:
        return {"weight": w.float()}

    def matmul(self, x, packed):
        return x @ packed["weight"].T

    def weight_bytes(self, O: int, K: int) -> float:
        return 2.0 * O * K  # fp16 storage


class FP16(Scheme):
    """float16 weights, float32 activations and arithmetic: how LiteVAR's released code protects
    ffn.fc2 (it keeps that layer in 16 bit), at half the bytes of float32 weights. The compiled
    kernels sum the same products in another order (not bit for bit, like fp32)."""
    name = "fp16"

    def pack(self, w):
        return {"weight": w.half()}

    def matmul(self, x, packed):
        return x @ packed["weight"].float().T


class W8A8(Scheme):
    name = "w8a8"
    act_bits = 8

    def pack(self, w):
        q, s = quantize_weight_int8(w)
        return {"qweight": q, "scales": s}

    def matmul(self, x, packed):
        xq, sx = quantize_per_token_int8(x, self.act_bits)
        acc = int_matmul(xq, packed["qweight"]).float()
        return acc * sx * packed["scales"]

    def weight_bytes(self, O, K):
        return O * K + 4.0 * O


class W4A16(Scheme):
    name = "w4a16"

    def pack(self, w):
        q, s = quantize_weight_int4(w, self.group)
        return {"qweight": pack_int4(q), "scales": s}

    def dequantize(self, packed):
        q = unpack_int4(packed["qweight"]).float()
        O, K = q.shape
        return (q.view(O, K // self.group, self.group) * packed["scales"].float()[..., None]).view(O, K)

    def matmul(self, x, packed):
        return x @ self.dequantize(packed).T

    def weight_bytes(self, O, K):
        return O * K / 2 + 2.0 * O * (K // self.group)


class W4A8(W4A16):
    name = "w4a8"
    act_bits = 8

    def matmul(self, x, packed):
        xq, sx = quantize_per_token_int8(x, self.act_bits)
        q = unpack_int4(packed["qweight"])
        O, K = q.shape
        G = K // self.group
        # exact integer partial sums per group, then the group scales (float64, exact products)
        xg = xq.double().reshape(*xq.shape[:-1], G, self.group)
        qg = q.double().view(O, G, self.group)
        acc = torch.einsum("...gk,ogk->...og", xg, qg)
        y = (acc * packed["scales"].double()).sum(-1).float()
        return y * sx


class W8A4(W8A8):
    """4-bit activations: simulation only, for the sensitivity sweep (the paper's Figure 5)."""
    name, act_bits = "w8a4", 4


class W4A4(W4A8):
    name, act_bits = "w4a4", 4


SCHEMES = {cls.name: cls for cls in (Scheme, FP16, W8A8, W4A16, W4A8, W8A4, W4A4)}


def make_scheme(name: str, group: int | None = None) -> Scheme:
    return SCHEMES[name](group)


class QuantLinear(nn.Module):
    """A Linear whose weight lives in packed integer form; forward follows the scheme's arithmetic."""

    def __init__(self, linear: nn.Linear, scheme: Scheme):
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = linear.weight.shape
        for k, v in scheme.pack(linear.weight.detach()).items():
            self.register_buffer(k, v)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def packed(self) -> dict:
        return {k: v for k, v in self.named_buffers() if k != "bias"}

    def forward(self, x):
        y = self.scheme.matmul(x, self.packed())
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"{self.in_features}→{self.out_features}, {self.scheme.name}, group={self.scheme.group}"
