"""2-D convolution (NCHW, stride 1, 'same' padding) as a scheduled TIR kernel for CPUs.

Same register tiling as the dense kernel (schedules/matmul.py), with output channels in the
role of rows (weights broadcast) and 16 contiguous output pixels of a row in the vector lanes,
so every input load is a contiguous vector. The VQVAE decoder is made of these convolutions.
"""
from __future__ import annotations

from functools import lru_cache

from tvm.script import tirx as T

from schedules.matmul import row_tile


@lru_cache(maxsize=None)  # one parse per shape
def conv2d(B: int, Ci: int, H: int, W: int, Co: int, k: int):
    """x B×Ci×H×W, w Co×Ci×k×k, b Co → y B×Co×H×W (zero padding k//2, stride 1).

    Written already scheduled: the padded input is copied once, then one parallel task per
    (image, tile of `mi` output channels, output row) keeps an mi × lanes accumulator tile in
    registers through the whole Ci·k·k reduction of each strip of `lanes` pixels."""
    p = k // 2
    Hp, Wp = H + 2 * p, W + 2 * p
    lanes = next((v for v in (16, 8) if W % v == 0), 1)
    mi = row_tile(Co)
    i64 = T.int64

    @T.prim_func(private=True)
    def conv(x: T.Buffer((i64(B), i64(Ci), i64(H), i64(W)), "float32"),
             w: T.Buffer((i64(Co), i64(Ci), i64(k), i64(k)), "float32"),
             b: T.Buffer((i64(Co),), "float32"),
             y: T.Buffer((i64(B), i64(Co), i64(H), i64(W)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xp = T.decl_buffer((B, Ci, Hp, Wp), "float32")
        for nc in T.parallel(B * Ci):
            for i in range(Hp):
                for j in range(Wp):
                    xp[nc // Ci, nc % Ci, i, j] = T.Select((i >= p) & (i < H + p) & (j >= p) & (j < W + p),
                                                           x[nc // Ci, nc % Ci, T.max(i - p, 0), T.max(j - p, 0)],
                                                           T.float32(0))
        for task in T.parallel(B * (Co // mi) * H):
            n = task // ((Co // mi) * H)
            o0 = task // H % (Co // mi) * mi
            i = task % H
            acc = T.decl_buffer((mi, lanes), "float32", scope="local")
            for jo in range(W // lanes):
                for oi in T.unroll(mi):
                    for u in T.vectorized(lanes):
                        acc[oi, u] = T.float32(0)
                for c in range(Ci):
                    for r in T.unroll(k):
                        for s in T.unroll(k):
                            for oi in T.unroll(mi):
                                for u in T.vectorized(lanes):
                                    acc[oi, u] = acc[oi, u] + xp[n, c, i + r, jo * lanes + s + u] * w[o0 + oi, c, r, s]
                for oi in T.unroll(mi):
                    for u in T.vectorized(lanes):
                        y[n, o0 + oi, i, jo * lanes + u] = acc[oi, u] + b[o0 + oi]

    return conv.with_attr("tirx.is_scheduled", True)
