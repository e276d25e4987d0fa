"""GroupNorm (optionally followed by SiLU) as a scheduled TIR kernel for CPUs.

The VQVAE decoder normalises 160 channels of 256×256 before most of its convolutions. Relax's
group_norm, scheduled by DLight's CPU reduction rule, took 76 ms per call there (d16); this
kernel takes one parallel task per (image, group), whose channels are one contiguous run of
memory: a vectorised sum, a vectorised sum of squared deviations (two passes, as PyTorch's
accuracy needs), then one pass that scales, shifts and applies SiLU.
"""
from __future__ import annotations

from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

from schedules.attention import fast_exp

LANES = 8        # fp32 lanes of an AVX2 / two NEON registers
CHAINS = 4       # independent accumulators per lane, for the adder's latency


def applies(H: int, W: int) -> bool:
    return (H * W) % LANES == 0


def silu(v):
    """v·sigmoid(v) with exp of −|v| only, where fast_exp is accurate; both sides vectorise."""
    t = fast_exp(-tirx.abs(v))
    one = tirx.const(1.0, "float32")
    return v * tirx.Select(v >= tirx.const(0.0, "float32"), one / (one + t), t / (one + t))


@lru_cache(maxsize=None)  # one parse per shape
def group_norm(B: int, C: int, H: int, W: int, G: int, eps: float, with_silu: bool):
    """x B×C×H×W, γ C, β C → y = GroupNorm(x) (then SiLU when `with_silu`), PyTorch's formula:
    (x − mean) / sqrt(var + eps) · γ + β with the biased variance of each group."""
    cg, hw = C // G, H * W
    n = cg * hw
    steps = n // (LANES * CHAINS)
    rest = (n - steps * LANES * CHAINS) // LANES
    i64 = T.int64

    @T.prim_func(private=True)
    def gn(x: T.Buffer((i64(B), i64(C), i64(H), i64(W)), "float32"),
           gamma: T.Buffer((i64(C),), "float32"),
           beta: T.Buffer((i64(C),), "float32"),
           y: T.Buffer((i64(B), i64(C), i64(H), i64(W)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xf = T.decl_buffer((B * C * hw,), "float32", data=x.data)
        yf = T.decl_buffer((B * C * hw,), "float32", data=y.data)
        for task in T.parallel(B * G):
            base = task * n                     # the group's channels are contiguous
            acc = T.decl_buffer((CHAINS * LANES,), "float32", scope="local")
            stat = T.decl_buffer((2,), "float32", scope="local")   # mean, 1/std
            for a in T.vectorized(CHAINS * LANES):
                acc[a] = T.float32(0)
            for s in range(steps):
                for a in T.vectorized(CHAINS * LANES):
                    acc[a] = acc[a] + xf[base + s * CHAINS * LANES + a]
            for s in range(rest):
                for u in T.vectorized(LANES):
                    acc[u] = acc[u] + xf[base + steps * CHAINS * LANES + s * LANES + u]
            stat[0] = T.float32(0)
            for a in range(CHAINS * LANES):
                stat[0] = stat[0] + acc[a]
            stat[0] = stat[0] / T.float32(n)
            for a in T.vectorized(CHAINS * LANES):
                acc[a] = T.float32(0)
            for s in range(steps):
                for a in T.vectorized(CHAINS * LANES):
                    acc[a] = acc[a] + (xf[base + s * CHAINS * LANES + a] - stat[0]) * (xf[base + s * CHAINS * LANES + a] - stat[0])
            for s in range(rest):
                for u in T.vectorized(LANES):
                    acc[u] = acc[u] + (xf[base + steps * CHAINS * LANES + s * LANES + u] - stat[0]) \
                        * (xf[base + steps * CHAINS * LANES + s * LANES + u] - stat[0])
            stat[1] = T.float32(0)
            for a in range(CHAINS * LANES):
                stat[1] = stat[1] + acc[a]
            stat[1] = T.float32(1) / T.sqrt(stat[1] / T.float32(n) + T.float32(eps))
            for c in range(cg):
                ch = task % G * cg + c
                for s in range(hw // LANES):
                    for u in T.vectorized(LANES):
                        if with_silu:
                            yf[base + c * hw + s * LANES + u] = silu(
                                (xf[base + c * hw + s * LANES + u] - stat[0]) * stat[1] * gamma[ch] + beta[ch])
                        else:
                            yf[base + c * hw + s * LANES + u] = \
                                (xf[base + c * hw + s * LANES + u] - stat[0]) * stat[1] * gamma[ch] + beta[ch]

    return gn.with_attr("tirx.is_scheduled", True)
