"""GroupNorm (then SiLU) and VAR's modulated LayerNorm as scheduled TIR kernels for CPUs.

The VQVAE decoder normalises 160 channels of 256×256 before most of its convolutions. Relax's
group_norm, scheduled by DLight's CPU reduction rule, took 76 ms per call there (d16); this
kernel takes one parallel task per (image, group), whose channels are one contiguous run of
memory: a vectorised sum, a vectorised sum of squared deviations (two passes, as PyTorch's
accuracy needs), then one pass that scales, shifts and applies SiLU. The transformer's
LayerNorm + AdaLN modulation is the same kernel with a token's C channels as the group.
"""
from __future__ import annotations

from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

from schedules.attention import fast_exp

LANES = 8        # fp32 lanes of an AVX2 / two NEON registers
CHAINS = 4       # independent accumulators per lane, for the adder's latency
MIN_PARALLEL_ROWS = 16   # LayerNorm: fewer rows (VAR's first scales) run serially; a row of d16 is
                         # ~1 µs of work, about what waking the pool costs (a guess, not timed)


def applies(H: int, W: int) -> bool:
    return (H * W) % LANES == 0


def silu(v):
    """v·sigmoid(v) with exp of −|v| only, where fast_exp is accurate; both sides vectorise."""
    t = fast_exp(-tirx.abs(v))
    one = tirx.const(1.0, "float32")
    return v * tirx.Select(v >= tirx.const(0.0, "float32"), one / (one + t), t / (one + t))


def _stats(n: int, eps: float):
    """A macro: stat[0] = the mean and stat[1] = 1/sqrt(var + eps) of the n floats xf[base …]
    (n a multiple of LANES), in a vectorised sum and a vectorised sum of squared deviations (two
    passes, as PyTorch's accuracy needs). acc: CHAINS·LANES floats of scratch."""
    steps = n // (LANES * CHAINS)
    rest = (n - steps * LANES * CHAINS) // LANES

    @T.macro
    def stats(xf, base, acc, stat):
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

    return stats


@lru_cache(maxsize=None)  # one parse per shape
def group_norm(B: int, C: int, H: int, W: int, G: int, eps: float, with_silu: bool):
    """x B×C×H×W, γ C, β C → y = GroupNorm(x) (then SiLU when `with_silu`), PyTorch's formula:
    (x − mean) / sqrt(var + eps) · γ + β with the biased variance of each group."""
    cg, hw = C // G, H * W
    n = cg * hw
    stats = _stats(n, eps)
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
            stats(xf, base, acc, stat)
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


@lru_cache(maxsize=None)  # one parse per shape
def layer_norm_modulate(NB: int, n: int, C: int, eps: float):
    """x NB×n×C, scale and shift NB×1×C → y = LayerNorm(x)·(1 + scale) + shift, VAR's AdaLN
    (a LayerNorm without weights): one row per task when there are enough rows to share out.
    DLight's CPU reduction rule ran it as scalar loops (~0.75 ms for d16's 512 rows, 5 GB/s)."""
    stats = _stats(C, eps)
    rows = T.parallel if NB * n >= MIN_PARALLEL_ROWS else T.serial
    i64 = T.int64

    @T.prim_func(private=True)
    def ln(x: T.Buffer((i64(NB), i64(n), i64(C)), "float32"),
           scale: T.Buffer((i64(NB), i64(1), i64(C)), "float32"),
           shift: T.Buffer((i64(NB), i64(1), i64(C)), "float32"),
           y: T.Buffer((i64(NB), i64(n), i64(C)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xf = T.decl_buffer((NB * n * C,), "float32", data=x.data)
        yf = T.decl_buffer((NB * n * C,), "float32", data=y.data)
        for r in rows(NB * n):
            acc = T.decl_buffer((CHAINS * LANES,), "float32", scope="local")
            stat = T.decl_buffer((2,), "float32", scope="local")   # mean, 1/std
            stats(xf, r * C, acc, stat)
            for s in range(C // LANES):
                for u in T.vectorized(LANES):
                    yf[r * C + s * LANES + u] = (xf[r * C + s * LANES + u] - stat[0]) * stat[1] \
                        * (scale[r // n, 0, s * LANES + u] + T.float32(1)) + shift[r // n, 0, s * LANES + u]

    return ln.with_attr("tirx.is_scheduled", True)
