"""2-D convolution (NCHW, stride 1, 'same' padding) as a scheduled TIR kernel for CPUs.

Same register tiling as the dense kernel (schedules/matmul.py): a tile of `mi` output channels
× 16 contiguous output pixels of a row stays in vector registers through the whole Ci·k·k
reduction. Pixels are the vector lanes, so every input load is a contiguous vector; the weights
are pre-packed (`pack_weight`) so that the `mi` values broadcast at each step share one cache
line. The VQVAE decoder is made of these convolutions.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from tvm.script import tirx as T


PIXEL_BLOCKS_BYTES = 512 << 10   # 1×1 convolutions of larger images (per image) copy pixel blocks;
                                 # smaller ones stay in L2, where the copy costs more than it saves
                                 # (the demo's 64→192 at 16²: 0.13–0.16 → 0.21–0.24 ms copied)


def channel_tile(Co: int) -> int:
    """Output channels per register tile: 5×2 (or 6×2, 4×2 …) accumulator vectors plus two input
    vectors and a broadcast fill the 16 AVX2 registers."""
    return next(m for m in (5, 6, 4, 3, 2, 1) if Co % m == 0)


def pack_weight(w: np.ndarray) -> np.ndarray:
    """Co×Ci×k×k (the checkpoint's layout) → Co/mi × Ci × k × k × mi."""
    Co, Ci, k, _ = w.shape
    mi = channel_tile(Co)
    return np.ascontiguousarray(w.reshape(Co // mi, mi, Ci, k, k).transpose(0, 2, 3, 4, 1))


@lru_cache(maxsize=None)  # one parse per shape
def conv2d(B: int, Ci: int, H: int, W: int, Co: int, k: int, pixel_blocks: bool | None = None):
    """x B×Ci×H×W, packed w (pack_weight), b Co → y B×Co×H×W (zero padding k//2, stride 1).

    Written already scheduled: the padded input is copied once, then one parallel task per
    (image, output row, tile of `mi` output channels). The channel tile runs innermost, so the
    k input rows a task reads stay in L2 for all tiles of a row: with the tiles outermost
    (the first version) every tile streamed the whole input, 42 MB at 256², from memory,
    and the 256 px decoder ran at a third of the speed.

    pixel_blocks (1×1 only; by default for inputs of PIXEL_BLOCKS_BYTES and more): the copy
    holds blocks of `lanes` pixels × all channels, so that a task reads its pixels channel after
    channel from consecutive addresses. Read from NCHW, the channels of a pixel vector lie H·W·4
    bytes apart, 64 KB at 128²: all in one cache set, and the 1×1 convolutions ran at a fifth of
    the 3×3 rate (320→160 at 128²: 20 G multiply-adds/s; side by side 41 → 18 ms, and 1.2–1.6×
    at 640 channels and 16², 32²)."""
    if pixel_blocks is None:
        pixel_blocks = k == 1 and Ci * H * W * 4 >= PIXEL_BLOCKS_BYTES
    if pixel_blocks and k != 1:
        raise ValueError("pixel blocks are for 1×1 convolutions")
    p = k // 2
    Hp, Wp = H + 2 * p, W + 2 * p
    lanes = next((v for v in (16, 8) if W % v == 0), 1)
    mi = channel_tile(Co)
    nt = Co // mi
    nb = W // lanes              # pixel vectors per row
    i64 = T.int64

    def pixels(src, n, c, i, jo, r, s, u):
        """Lane u of the input vector that tap (r, s) reads for pixel vector jo of row i."""
        return src[n, i, jo, c, u] if pixel_blocks else src[n, c, i + r, jo * lanes + s + u]

    @T.prim_func(private=True)
    def conv(x: T.Buffer((i64(B), i64(Ci), i64(H), i64(W)), "float32"),
             w: T.Buffer((i64(nt), i64(Ci), i64(k), i64(k), i64(mi)), "float32"),
             b: T.Buffer((i64(Co),), "float32"),
             y: T.Buffer((i64(B), i64(Co), i64(H), i64(W)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xp = T.decl_buffer((B, H, nb, Ci, lanes) if pixel_blocks else (B, Ci, Hp, Wp), "float32")
        if pixel_blocks:
            for nc in T.parallel(B * Ci):
                for i in range(H):
                    for jo in range(nb):
                        for u in T.vectorized(lanes):
                            xp[nc // Ci, i, jo, nc % Ci, u] = x[nc // Ci, nc % Ci, i, jo * lanes + u]
        else:
            for nc in T.parallel(B * Ci):
                for i in range(Hp):
                    for j in range(Wp):
                        xp[nc // Ci, nc % Ci, i, j] = T.Select((i >= p) & (i < H + p) & (j >= p) & (j < W + p),
                                                               x[nc // Ci, nc % Ci, T.max(i - p, 0), T.max(j - p, 0)],
                                                               T.float32(0))
        for task in T.parallel(B * H * nt):
            n = task // (H * nt)
            i = task // nt % H
            ot = task % nt
            acc = T.decl_buffer((mi, lanes), "float32", scope="local")
            for jo in range(nb):
                for oi in T.unroll(mi):
                    for u in T.vectorized(lanes):
                        acc[oi, u] = T.float32(0)
                for c in range(Ci):
                    for r in T.unroll(k):
                        for s in T.unroll(k):
                            for oi in T.unroll(mi):
                                for u in T.vectorized(lanes):
                                    acc[oi, u] = acc[oi, u] + pixels(xp, n, c, i, jo, r, s, u) * w[ot, c, r, s, oi]
                for oi in T.unroll(mi):
                    for u in T.vectorized(lanes):
                        y[n, ot * mi + oi, i, jo * lanes + u] = acc[oi, u] + b[ot * mi + oi]

    return conv.with_attr("tirx.is_scheduled", True)


@lru_cache(maxsize=None)
def im2col_3x3(C: int, H: int, W: int, r0: int = 0, rows: int | None = None):
    """One image x 1×C×H×W → the columns of a 3×3, stride-1, zero-padded convolution for output
    rows r0 … r0 + rows − 1, (C·9)×(rows·W): row c·9 + 3·i + j holds channel c shifted by
    (i − 1, j − 1). GPU builds multiply the weights (Co × C·9) by them in one plain matmul, which
    DLight's matmul rule tiles well. Left to Relax, a conv2d reaches that rule as an implicit GEMM
    that gathers its input through /9 and %3 per element into 16-deep tiles: d16's decoder then
    took 278 ms of a 339 ms image on an H200.

    Unscheduled (DLight binds its loops), but opaque (op_pattern 8) so that FuseOps cannot fold it
    back into the matmul."""
    from tvm import te, tirx
    rows = H - r0 if rows is None else rows
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731  (Relax's shapes are int64)
    x = te.placeholder((i64(1), i64(C), i64(H), i64(W)), "float32", name="x")

    def column(r, n):
        c, t = r // 9, r % 9
        h, w = r0 + n // W + t // 3 - 1, n % W + t % 3 - 1
        inside = te.all(h >= 0, h < H, w >= 0, w < W)
        return te.if_then_else(inside, x[0, c, te.max(te.min(h, H - 1), 0), te.max(te.min(w, W - 1), 0)],
                               tirx.const(0.0, "float32"))

    col = te.compute((i64(C * 9), i64(rows * W)), column, name="im2col")
    return te.create_prim_func([x, col]).without_attr("global_symbol").with_attr("op_pattern", 8)
