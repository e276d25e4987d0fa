"""3×3 convolution by Winograd's F(4×4, 3×3) as a scheduled TIR kernel for CPUs.

Each 4×4 block of output pixels ("tile") is computed from the 6×6 input patch around it: the
patch is transformed (Bᵀ·d·B), multiplied element-wise by the transformed filter (G·g·Gᵀ) and
summed over input channels, then transformed back (Aᵀ·m·A). The sum over channels is 36
independent matrix products, Co×Ci times Ci×tiles: 36 multiply-adds per tile and channel pair
instead of the direct convolution's 144, 4× less arithmetic. The VQVAE decoder spends nearly
all of its time in 3×3 convolutions.

Passes, each simple to vectorise (lanes run over L tiles, or over the 6 channels of a filter
tile):
    zero padding      x → xp, each row split by column phase (4·j + k at [k, j])
    filter transform  w (schedules.conv.pack_weight) → U  36 × ⌈Co/6⌉ × Ci × 6 (zeros past Co)
    input transform   xp    → V  36 × tiles × Ci
    matrix products   U, V  → M  36 × tiles × Co  (register tile 6 channels × L)
    output transform  M     → y  plus the bias, 4×4 pixels per tile
The last three run in one of three layouts (`layout_for`):
- "fused": one task per vector of L tiles, all three passes, M one product tile at a time: its V
  stays in the core's L2 and M in L1. For few input channels over many tiles (the 160-channel
  convolutions at 128² and 256²: alone, side by side with the bands, 1.14–1.19× in three runs
  of 15 repetitions, 1.00–1.23× in two of 7; 1.26× at 256² in one instrumented run of the d16
  decoder);
- "own_filters": in bands of tiles (V and M of a band in L3), each pass parallel on its own; the
  products run one task per product tile, which first transforms its own 6 output channels'
  filters, so U never exists whole. For many channels (U of 320 and 640 channels is 14.7 and 59
  MB, past L3: written and read back from memory on every call, and once per band, it was most
  of a 16² convolution). Side by side with the bands (one-off script, 7 samples): 640→640 at
  16² 1.71–1.81×, 32² 1.56–1.63×, 640→320 at 32² 1.29–1.60×, 320→320 at 32² 1.45×, 64²
  1.09–1.18×, 128² 1.04×;
- "bands": bands of tiles with U transformed once per call: for few channels over few tiles (the
  demo model's decoder), where U fits the caches and too few product tiles would leave a core idle.
The matrices are Lavin & Gray's (arXiv 1509.09308, interpolation points 0, ±1, ±2, ∞), written
out as sums because most of their entries are 0 or ±1.
"""
from __future__ import annotations

from functools import lru_cache

from tvm.script import tirx as T

from schedules.conv import channel_tile

MIN_PIXELS = 16 * 16
PT = 6                 # output channels per product tile: 6×2 accumulators hide the FMA latency
BAND_BYTES = 2 << 20   # V and M of one band of tiles: small enough to stay in the caches
OWN_FILTERS_BAND_BYTES = 12 << 20  # V and M of a band in the own_filters layout, within L3 (32 MB
                                   # here); 6 and 3 MB were 1.1–1.5× slower on 640 channels at 32²
OWN_FILTERS_U_BYTES = 2 << 20      # from this size of U on, each task transforms its own filters
FUSED_V_BYTES = 384 << 10  # a task's own V, within a core's L2: 512 KB here and on the Pi 5's
                           # Cortex-A76 (the Orin's A78AE has 256 KB: not measured there)
TASKS = 16             # tile vectors the fused layout needs: tasks enough to balance the cores


def applies(Co: int, k: int, stride: int, padding: int, H: int, W: int) -> bool:
    """Worth it from 16×16 pixels and 16 output channels on. Below, transforming the filters
    (every call, so that the weights keep their size) costs more than it saves. Side-by-side
    timings against the direct kernel, after the input was stored by column phase: at 16²,
    640→640 1.52–1.58× faster, 512→512 1.44×, 160→160 1.27×, 32→640 1.37×, 320→320 0.97–1.04×;
    at 8², 640→640 0.57× and 64→64 0.60×. With 3 output channels the data transforms outweigh
    the few products."""
    return (k == 3 and stride == 1 and padding == 1 and H % 4 == 0 and W % 4 == 0
            and H * W >= MIN_PIXELS and Co >= 16)


def lanes_for(tiles: int) -> int:
    return next(v for v in (16, 8, 4, 2, 1) if tiles % v == 0)


def fused(B: int, Ci: int, H: int, W: int) -> bool:
    """Whether conv2d runs one task per tile vector (few input channels over many tiles: its V
    fits a core's L2, and there are tasks for every core) rather than in bands."""
    L = lanes_for(H // 4 * (W // 4))
    return 36 * Ci * L * 4 <= FUSED_V_BYTES and B * (H // 4) * (W // 4) // L >= TASKS


def layout_for(B: int, Ci: int, H: int, W: int, Co: int) -> str:
    """Which of the three layouts (module docstring) conv2d runs."""
    if fused(B, Ci, H, W):
        return "fused"
    return "own_filters" if 36 * Ci * Co * 4 >= OWN_FILTERS_U_BYTES else "bands"


def band_vectors(NV: int, Ci: int, Co: int, L: int, max_bytes: int) -> int:
    """Tile vectors per band: the most that divide the image's NV and keep V and M within max_bytes."""
    return max(g for g in range(1, NV + 1) if NV % g == 0 and (g == 1 or 36 * (Ci + Co) * g * L * 4 <= max_bytes))


@lru_cache(maxsize=None)  # one parse per shape
def conv2d(B: int, Ci: int, H: int, W: int, Co: int):
    """x B×Ci×H×W, w packed as for the direct kernel (schedules.conv.pack_weight), b Co →
    y B×Co×H×W: the 3×3 convolution with zero padding 1, stride 1. H and W must be multiples
    of 4 (`applies`).

    Except in the fused layout, the tiles are taken in bands of BV vectors of L tiles; the data
    passes run band by band, so V and M of a band stay in the caches (at 256² all of V would be
    94 MB)."""
    TH, TW = H // 4, W // 4
    L = lanes_for(TH * TW)
    NV = TH * TW // L                           # tile vectors per image
    layout = layout_for(B, Ci, H, W, Co)
    BV = band_vectors(NV, Ci, Co, L, OWN_FILTERS_BAND_BYTES if layout == "own_filters" else BAND_BYTES)
    Hp = H + 2
    mi = channel_tile(Co)        # the packed weights' channel tile
    ntp = (Co + PT - 1) // PT    # product tiles; U and M padded with zero channels up to ntp·PT

    def clamped(ot, oi):
        return T.min(ot * PT + oi, Co - 1)
    i64 = T.int64
    Wq = W // 4 + 1   # padded columns by phase: xp[…, i, k, j] is padded column 4·j + k
    if TW % L == 0:   # the L tiles of a vector share a tile row: contiguous loads, no per-lane division
        def top(tv, l):
            return tv // (TW // L) * 4

        def tcol(tv, l):
            return tv % (TW // L) * L + l
    else:
        def top(tv, l):
            return (tv * L + l) // TW * 4

        def tcol(tv, l):
            return (tv * L + l) % TW

    def left(tv, l):
        return tcol(tv, l) * 4

    @T.macro
    def input_transform(xp, V, d, e, n, c, tvg, tvl):
        """V[·, tvl, c] = Bᵀ·d·B, d the 6×6 patch of each tile of tile vector tvg; lanes: L tiles."""
        for r in T.unroll(6):
            for s in T.unroll(6):
                for l in T.vectorized(L):
                    d[r, s, l] = xp[n, c, top(tvg, l) + r, s % 4, tcol(tvg, l) + s // 4]
        for s in T.unroll(6):  # e = Bᵀ·d, down the columns
            for l in T.vectorized(L):
                e[0, s, l] = 4 * d[0, s, l] - 5 * d[2, s, l] + d[4, s, l]
                e[1, s, l] = d[3, s, l] + d[4, s, l] - 4 * (d[1, s, l] + d[2, s, l])
                e[2, s, l] = d[4, s, l] - d[3, s, l] + 4 * (d[1, s, l] - d[2, s, l])
                e[3, s, l] = d[4, s, l] - d[2, s, l] + 2 * (d[3, s, l] - d[1, s, l])
                e[4, s, l] = d[4, s, l] - d[2, s, l] + 2 * (d[1, s, l] - d[3, s, l])
                e[5, s, l] = 4 * d[1, s, l] - 5 * d[3, s, l] + d[5, s, l]
        for a in T.unroll(6):  # V = e·B, along the rows
            for l in T.vectorized(L):
                V[a * 6 + 0, tvl, c, l] = 4 * e[a, 0, l] - 5 * e[a, 2, l] + e[a, 4, l]
                V[a * 6 + 1, tvl, c, l] = e[a, 3, l] + e[a, 4, l] - 4 * (e[a, 1, l] + e[a, 2, l])
                V[a * 6 + 2, tvl, c, l] = e[a, 4, l] - e[a, 3, l] + 4 * (e[a, 1, l] - e[a, 2, l])
                V[a * 6 + 3, tvl, c, l] = e[a, 4, l] - e[a, 2, l] + 2 * (e[a, 3, l] - e[a, 1, l])
                V[a * 6 + 4, tvl, c, l] = e[a, 4, l] - e[a, 2, l] + 2 * (e[a, 1, l] - e[a, 3, l])
                V[a * 6 + 5, tvl, c, l] = 4 * e[a, 1, l] - 5 * e[a, 3, l] + e[a, 5, l]

    @T.macro
    def products(u, ue, uo, V, acc, M, ei, tvl, ch):
        """M[ei, tvl, ch … ch+PT−1] = U[ei]·V[ei] over the input channels, U[ei] of this product
        tile read from u[ue, uo]."""
        for oi in T.unroll(PT):
            for l in T.vectorized(L):
                acc[oi, l] = T.float32(0)
        for c in range(Ci):
            for oi in T.unroll(PT):
                for l in T.vectorized(L):
                    acc[oi, l] = acc[oi, l] + V[ei, tvl, c, l] * u[ue, uo, c, oi]
        for oi in T.unroll(PT):
            for l in T.vectorized(L):
                M[ei, tvl, ch + oi, l] = acc[oi, l]

    @T.macro
    def output_transform(M, f, y, b, n, o, ch, tvg, tvl):
        """y[n, o] = Aᵀ·m·A + bias for tile vector tvg, m = M[·, tvl, ch], scattered back to the
        4×4 pixels of each tile."""
        for s in T.unroll(6):  # f = Aᵀ·m, down the columns
            for l in T.vectorized(L):
                f[0, s, l] = (M[s, tvl, ch, l] + M[6 + s, tvl, ch, l] + M[12 + s, tvl, ch, l]
                              + M[18 + s, tvl, ch, l] + M[24 + s, tvl, ch, l])
                f[1, s, l] = (M[6 + s, tvl, ch, l] - M[12 + s, tvl, ch, l]
                              + 2 * (M[18 + s, tvl, ch, l] - M[24 + s, tvl, ch, l]))
                f[2, s, l] = (M[6 + s, tvl, ch, l] + M[12 + s, tvl, ch, l]
                              + 4 * (M[18 + s, tvl, ch, l] + M[24 + s, tvl, ch, l]))
                f[3, s, l] = (M[6 + s, tvl, ch, l] - M[12 + s, tvl, ch, l]
                              + 8 * (M[18 + s, tvl, ch, l] - M[24 + s, tvl, ch, l]) + M[30 + s, tvl, ch, l])
        for i in T.unroll(4):  # y = f·A, along the rows
            for l in T.vectorized(L):
                y[n, o, top(tvg, l) + i, left(tvg, l) + 0] = (
                    f[i, 0, l] + f[i, 1, l] + f[i, 2, l] + f[i, 3, l] + f[i, 4, l] + b[o])
                y[n, o, top(tvg, l) + i, left(tvg, l) + 1] = (
                    f[i, 1, l] - f[i, 2, l] + 2 * (f[i, 3, l] - f[i, 4, l]) + b[o])
                y[n, o, top(tvg, l) + i, left(tvg, l) + 2] = (
                    f[i, 1, l] + f[i, 2, l] + 4 * (f[i, 3, l] + f[i, 4, l]) + b[o])
                y[n, o, top(tvg, l) + i, left(tvg, l) + 3] = (
                    f[i, 1, l] - f[i, 2, l] + 8 * (f[i, 3, l] - f[i, 4, l]) + f[i, 5, l] + b[o])

    @T.macro
    def filter_transform(w, g, gt, u, ot, uo, c):
        """u[·, uo, c] = G·g·Gᵀ for input channel c of the PT output channels of product tile ot."""
        # the taps of output channels ot·PT …, 0 past Co. Loaded clamped in a statement of
        # their own: under a Select's condition TVM's simplifier drops the clamp, and the
        # vector load still reads every lane, past the end of w (docs/tvm-0.27-findings.md)
        for r in T.unroll(3):
            for s in T.unroll(3):
                for oi in T.vectorized(PT):
                    g[r, s, oi] = w[clamped(ot, oi) // mi, c, r, s, clamped(ot, oi) % mi]
                for oi in T.vectorized(PT):
                    g[r, s, oi] = T.Select(ot * PT + oi < Co, g[r, s, oi], T.float32(0))
        for s in T.unroll(3):  # gt = G·g, down the columns
            for oi in T.vectorized(PT):
                gt[0, s, oi] = g[0, s, oi] * T.float32(1 / 4)
                gt[1, s, oi] = (g[0, s, oi] + g[1, s, oi] + g[2, s, oi]) * T.float32(-1 / 6)
                gt[2, s, oi] = (g[0, s, oi] - g[1, s, oi] + g[2, s, oi]) * T.float32(-1 / 6)
                gt[3, s, oi] = (g[0, s, oi] * T.float32(1 / 24) + g[1, s, oi] * T.float32(1 / 12)
                                + g[2, s, oi] * T.float32(1 / 6))
                gt[4, s, oi] = (g[0, s, oi] * T.float32(1 / 24) - g[1, s, oi] * T.float32(1 / 12)
                                + g[2, s, oi] * T.float32(1 / 6))
                gt[5, s, oi] = g[2, s, oi]
        for a in T.unroll(6):  # U = gt·Gᵀ, along the rows
            for oi in T.vectorized(PT):
                u[a * 6 + 0, uo, c, oi] = gt[a, 0, oi] * T.float32(1 / 4)
                u[a * 6 + 1, uo, c, oi] = (gt[a, 0, oi] + gt[a, 1, oi] + gt[a, 2, oi]) * T.float32(-1 / 6)
                u[a * 6 + 2, uo, c, oi] = (gt[a, 0, oi] - gt[a, 1, oi] + gt[a, 2, oi]) * T.float32(-1 / 6)
                u[a * 6 + 3, uo, c, oi] = (gt[a, 0, oi] * T.float32(1 / 24) + gt[a, 1, oi] * T.float32(1 / 12)
                                           + gt[a, 2, oi] * T.float32(1 / 6))
                u[a * 6 + 4, uo, c, oi] = (gt[a, 0, oi] * T.float32(1 / 24) - gt[a, 1, oi] * T.float32(1 / 12)
                                           + gt[a, 2, oi] * T.float32(1 / 6))
                u[a * 6 + 5, uo, c, oi] = gt[a, 2, oi]

    @T.macro
    def filter_transform_all(w, u):
        """U of every product tile, once per call, here rather than at build time: the weights
        keep their size."""
        for ot in T.parallel(ntp):
            gt = T.decl_buffer((6, 3, PT), "float32", scope="local")
            g = T.decl_buffer((3, 3, PT), "float32", scope="local")
            for c in range(Ci):
                filter_transform(w, g, gt, u, ot, ot, c)

    @T.prim_func(private=True)
    def wino(x: T.Buffer((i64(B), i64(Ci), i64(H), i64(W)), "float32"),
             w: T.Buffer((i64(Co // mi), i64(Ci), i64(3), i64(3), i64(mi)), "float32"),
             b: T.Buffer((i64(Co),), "float32"),
             y: T.Buffer((i64(B), i64(Co), i64(H), i64(W)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        xp = T.decl_buffer((B, Ci, Hp, 4, Wq), "float32")
        # Zero-padded and split by column phase (column 4·j + k at [k, j]), so that the input
        # transform reads the same patch entry of consecutive tiles as one contiguous vector.
        for nc in T.parallel(B * Ci):
            for i in range(Hp):
                for k in T.unroll(4):
                    for j in range(Wq):
                        xp[nc // Ci, nc % Ci, i, k, j] = T.Select(
                            (i >= 1) & (i <= H) & (4 * j + k >= 1) & (4 * j + k <= W),
                            x[nc // Ci, nc % Ci, T.min(T.max(i - 1, 0), H - 1), T.min(T.max(4 * j + k - 1, 0), W - 1)],
                            T.float32(0))
        # U of every product tile, transformed once per call; own_filters transforms it task by
        # task instead (no U: a zero-sized buffer, so that all layouts share one body)
        u = T.decl_buffer((36, 0 if layout == "own_filters" else ntp, Ci, PT), "float32")
        if layout != "own_filters":
            filter_transform_all(w, u)
        if layout == "fused":
            # One task per tile vector: it transforms its tiles' input into V, private to the task
            # (so in this core's L2), then for each product tile runs the 36 products into m and
            # transforms m back at once, so that the products stay in L1.
            for task in T.parallel(B * NV):
                n = task // NV
                tv = task % NV
                # V and m keep the bands' tile-vector axis (size 1 here): both layouts share the macros
                V = T.decl_buffer((36, 1, Ci, L), "float32")
                d = T.decl_buffer((6, 6, L), "float32", scope="local")
                e = T.decl_buffer((6, 6, L), "float32", scope="local")
                acc = T.decl_buffer((PT, L), "float32", scope="local")
                m = T.decl_buffer((36, 1, PT, L), "float32", scope="local")
                f = T.decl_buffer((4, 6, L), "float32", scope="local")
                for c in range(Ci):
                    input_transform(xp, V, d, e, n, c, tv, 0)
                for ot in range(ntp):
                    for ei in range(36):
                        products(u, ei, ot, V, acc, m, ei, 0, 0)
                    for oi in range(T.min(PT, Co - ot * PT)):
                        output_transform(m, f, y, b, n, ot * PT + oi, oi, tv, 0)
        else:
            # Bands of BV tile vectors, each pass parallel on its own: many channels over few
            # tiles, where a private V per task would not fit L2 and would be transformed again
            # by every task of the same tiles.
            V = T.decl_buffer((36, BV, Ci, L), "float32")
            M = T.decl_buffer((36, BV, ntp * PT, L), "float32")
            for n in range(B):
                for band in range(NV // BV):
                    for c in T.parallel(Ci):
                        d = T.decl_buffer((6, 6, L), "float32", scope="local")
                        e = T.decl_buffer((6, 6, L), "float32", scope="local")
                        for tv in range(BV):
                            input_transform(xp, V, d, e, n, c, band * BV + tv, tv)
                    if layout == "bands":
                        for ei in T.parallel(36):
                            acc = T.decl_buffer((PT, L), "float32", scope="local")
                            for tv in range(BV):
                                for ot in range(ntp):
                                    products(u, ei, ot, V, acc, M, ei, tv, ot * PT)
                    else:
                        # own_filters: one task per product tile transforms its own filters and
                        # multiplies every tile of the band by them while they are in the core's
                        # caches. Transformed again for every band: per input channel ~200
                        # instructions against 36·BV·12 FMAs (BV = 8 at 320 channels: ~5 %).
                        for ot in T.parallel(ntp):
                            ut = T.decl_buffer((36, 1, Ci, PT), "float32")
                            gt = T.decl_buffer((6, 3, PT), "float32", scope="local")
                            g = T.decl_buffer((3, 3, PT), "float32", scope="local")
                            acc = T.decl_buffer((PT, L), "float32", scope="local")
                            for c in range(Ci):
                                filter_transform(w, g, gt, ut, ot, 0, c)
                            for ei in range(36):
                                for tv in range(BV):
                                    products(ut, ei, 0, V, acc, M, ei, tv, ot * PT)
                    for o in T.parallel(Co):
                        f = T.decl_buffer((4, 6, L), "float32", scope="local")
                        for tv in range(BV):
                            output_transform(M, f, y, b, n, o, o, band * BV + tv, tv)

    return wino.with_attr("tirx.is_scheduled", True)
