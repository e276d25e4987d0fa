"""Attention of one scale against a block's preallocated KV cache, computing only kept pairs.

One kernel covers the three cases of a plan:
- dense: every key of every earlier scale;
- MDWA: per (head, key scale) a window w from the plan's table; query i of scale q keeps keys j
  of scale k with |i·n_k − j·n_q| < w·n_q (compiler/compress/mdwa.py), so each query walks one
  contiguous run of keys per key scale; w = 0 drops the key scale, w < 0 keeps it dense;
- ASC: under CFG the conditional half computes the softmax weights once; "map" applies them to
  both halves' values, "output" copies the conditional output to the unconditional half.

Cache layout, per block: 2 × NB × H × (⌈L/8⌉·8·c) for L places, keys in panels of 8 (panel t
holds keys 8t … 8t+7, channel-major: c × 8) and values row-major (V[b, h] is L × c). Panels let
the CPU kernel compute the scores of 16 consecutive keys as two vectors, with no horizontal
sums, while reading one contiguous 4 KB block per step (keys transposed over all of L put every
channel of a step in another cache line: one L1 miss per channel and step). Each scale starts
at a panel boundary (scale_slots: d16's 680 tokens take 720 places), so a dense run of keys
starts at a panel; a windowed run starts at the panel holding its first key, the rows mask the
keys before it, and its last step is 8 keys when that covers the run.

CPU: one parallel task per (batch, head, block of 6 query rows); the rows of a block keep
overlapping key runs, so the task computes their union once per key scale and masks each row
to its own run. Scores come 16 keys × 6 rows per step (12 vector accumulators sharing each key
load: 8 could not hide the FMA latency), then one softmax rescale per row and run, weights by a
vectorised polynomial exp, and acc += p·V, 16 channels × 6 rows at a time, sharing each value
load. GPU: one thread per row with a per-key online softmax (no score buffer in registers).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

NEG_INF = -3.0e38
KB = 8                # keys per score vector (AVX2: one register)
KT = 2                # score vectors per step and query row
STEP = KB * KT        # keys per step
QB = 6                # query rows per task: QB × KT score vectors in registers share each key load


def whole_panels(count):
    """Places that `count` keys take, rounded up to whole panels of KB."""
    return (count + KB - 1) // KB * KB


def cache_row(L: int, c: int) -> int:
    """Floats per (k or v, batch, head) row of the cache: whole panels of KB keys."""
    return whole_panels(L) * c


def scale_slots(patch_nums) -> np.ndarray:
    """S×2 int32, the kernels' `geom` table: each scale's first place in the cache (a multiple of
    KB) and its token count."""
    counts = np.array([p * p for p in patch_nums])
    places = whole_panels(counts)
    return np.stack([np.cumsum(places) - places, counts], 1).astype(np.int32)


def cache_len(patch_nums) -> int:
    """Places per (batch, head) in the cache: every scale's tokens, each scale padded to a panel."""
    return int(sum(whole_panels(p * p) for p in patch_nums))


def key_at(pos, cc, c: int):
    """Offset of channel cc of key `pos` in a keys row of the cache (TIR or numpy integers)."""
    return pos // KB * (KB * c) + cc * KB + pos % KB


def key_run(i, n, nk, w):
    """First and one-past-last kept key of query i (of n) in a key scale of nk tokens:
    lo = ceil((i·nk − w·n + 1)/n), hi = ⌊(i·nk + w·n − 1)/n⌋ + 1, clipped; w < 0: all keys."""
    lo = T.if_then_else(w < 0, 0, T.max(0, T.floordiv(i * nk - w * n + n, n)))
    hi = T.if_then_else(w < 0, nk, T.min(nk, T.floordiv(i * nk + w * n - 1, n) + 1))
    return lo, hi


def fast_exp(x):
    """exp(x) for x ≤ 0 in float32 lanes: 2ⁿ·p(r) with x = n·ln2 + r, |r| ≤ ln2/2, p of degree 7
    (relative error ~2e-7, like float32 expf); x below −87 gives ~1e-38 instead of 0, x above 0
    (only in lanes a Select discards) gives 1."""
    x = tirx.min(tirx.max(x, tirx.const(-87.0, "float32")), tirx.const(0.0, "float32"))
    n = tirx.floor(x * tirx.const(1.4426950408889634, "float32") + tirx.const(0.5, "float32"))
    r = x - n * tirx.const(0.693359375, "float32") + n * tirx.const(2.12194440e-4, "float32")
    p = tirx.const(1.9875691500e-4, "float32")
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + tirx.const(coef, "float32")
    p = p * r * r + r + tirx.const(1.0, "float32")
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return p * two_n


def cache_of(kv, patch_nums=None):
    """numpy 2×NB×H×T×c keys and values of T tokens → the cache layout above, tokens at their
    scale_slots places (tests, benchmarks); without patch_nums, token t at place t."""
    _, NB, H, T_, c = kv.shape
    place = np.arange(T_) if patch_nums is None else np.concatenate(
        [first + np.arange(count) for first, count in scale_slots(patch_nums)])
    L = T_ if patch_nums is None else cache_len(patch_nums)
    cache = np.zeros((2, NB, H, cache_row(L, c)), np.float32)
    pos, cc = np.meshgrid(place, np.arange(c), indexing="ij")
    cache[0][:, :, key_at(pos, cc, c)] = kv[0]
    cache[1][:, :, (place[:, None] * c + np.arange(c)).ravel()] = kv[1].reshape(NB, H, -1)
    return cache


@lru_cache(maxsize=None)  # one parse per shape
def kv_write(NB: int, H: int, n: int, c: int, L: int, begin: int):
    """Write one scale's k, v (NB×H×n×c) at place `begin` of a cache of L places, in place."""

    @T.prim_func(private=True, s_tir=True)
    def write_kv(kv: T.Buffer((T.int64(2), T.int64(NB), T.int64(H), T.int64(cache_row(L, c))), "float32"),
                 k: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32"),
                 v: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for b, h, cc, i in T.grid(T.int64(NB), T.int64(H), T.int64(c), T.int64(n)):
            with T.sblock("write_k"):
                vb, vh, vc, vi = T.axis.remap("SSSS", [b, h, cc, i])
                kv[T.int64(0), vb, vh, key_at(vi + T.int64(begin), vc, T.int64(c))] = k[vb, vh, vi, vc]
        for b, h, i, cc in T.grid(T.int64(NB), T.int64(H), T.int64(n), T.int64(c)):
            with T.sblock("write_v"):
                vb, vh, vi, vc = T.axis.remap("SSSS", [b, h, i, cc])
                kv[T.int64(1), vb, vh, (vi + T.int64(begin)) * T.int64(c) + vc] = v[vb, vh, vi, vc]

    return write_kv


def windowed_attention(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int,
                       share: str | None = None, gpu: bool = False):
    """out NB×H×n×c = softmax(q·kᵀ over kept keys)·v for query scale `qs`, on a cache of L places.

    Tables: win S×H×S int32 (window per query scale, head, key scale; −1 dense, 0 dropped) and
    geom S×2 int32 (scale_slots: first place and token count of each scale). `share`: None, "map"
    or "output"."""
    return (_attention_gpu if gpu else _attention_cpu)(NB, H, n, c, L, S, qs, share)


@lru_cache(maxsize=None)
def _attention_cpu(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int, share: str | None):
    half = NB // 2 if share else NB
    blocks = (n + QB - 1) // QB                  # query blocks per (batch, head)
    lanes = KB if c % KB == 0 else 1
    cw = 2 * lanes if c % (2 * lanes) == 0 else lanes   # channels per p·V pass: QB × cw/8 accumulators
    steps = lambda cnt, size: (cnt + size - 1) // size  # noqa: E731

    @T.macro
    def score_step(q, kv, sc, s8, b, h, i0, key, at, nv):
        """Scores of QB rows against nv vectors of KB keys from cache place `key` (the start of a
        panel), stored at sc[:, at:]: each key vector loaded once for all rows."""
        for r in T.unroll(QB):
            for t in T.unroll(nv):
                for u in T.vectorized(KB):
                    s8[r, t, u] = T.float32(0)
        for cc in range(c):
            for r in T.unroll(QB):
                for t in T.unroll(nv):
                    for u in T.vectorized(KB):
                        s8[r, t, u] = s8[r, t, u] + q[b, h, T.min(i0 + r, n - 1), cc] * kv[
                            0, b, h, (key // KB + t) * (KB * c) + cc * KB + u]
        for r in T.unroll(QB):
            for t in T.unroll(nv):
                for u in T.vectorized(KB):
                    sc[r, at + t * KB + u] = s8[r, t, u]

    @T.prim_func(private=True)
    def attention(q: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32"),
                  kv: T.Buffer((T.int64(2), T.int64(NB), T.int64(H), T.int64(cache_row(L, c))), "float32"),
                  win: T.Buffer((T.int64(S), T.int64(H), T.int64(S)), "int32"),
                  geom: T.Buffer((T.int64(S), T.int64(2)), "int32"),
                  out: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for task in T.parallel(half * H * blocks):
            b = task // (H * blocks)
            h = task // blocks % H
            i0 = task % blocks * QB
            m = T.decl_buffer((QB,), "float32", scope="local")
            l = T.decl_buffer((QB,), "float32", scope="local")
            corr = T.decl_buffer((QB,), "float32", scope="local")
            sc = T.decl_buffer((QB, L + 2 * STEP), "float32", scope="local")   # scores, then weights, of one run
            s8 = T.decl_buffer((QB, KT, KB), "float32", scope="local")
            red = T.decl_buffer((KB,), "float32", scope="local")
            pv = T.decl_buffer((QB, cw), "float32", scope="local")
            acc = T.decl_buffer((QB, c), "float32", scope="local")
            acc_u = T.decl_buffer((QB, c), "float32", scope="local")      # ASC "map": the other half
            for r in T.unroll(QB):
                m[r] = T.float32(NEG_INF)
                l[r] = T.float32(0)
                for cc in T.vectorized(c):
                    acc[r, cc] = T.float32(0)
                    acc_u[r, cc] = T.float32(0)
            for ks in range(qs + 1):
                w = win[qs, h, ks]
                nk = geom[ks, 1]
                # the block's rows keep overlapping runs (lo and hi grow with i): compute their union,
                # from the start of the panel that holds its first key (`skip` keys earlier)
                run_lo = key_run(i0, n, nk, w)[0]
                skip = (geom[ks, 0] + run_lo) % KB
                lo = run_lo - skip
                cnt = key_run(T.min(i0 + QB - 1, n - 1), n, nk, w)[1] - lo
                base = geom[ks, 0] + lo
                if cnt > skip:
                    # scores: QB rows × 16 keys per step (the last step 8 if that covers the run)
                    nv = steps(cnt, KB)
                    for jb in range(nv // KT):
                        score_step(q, kv, sc, s8, b, h, i0, base + jb * STEP, jb * STEP, KT)
                    if nv % KT != 0:
                        score_step(q, kv, sc, s8, b, h, i0, base + (nv - 1) * KB, (nv - 1) * KB, 1)
                    # per row: its own run inside the union, the online-softmax rescale, the weights
                    for r in range(QB):
                        row_lo, row_hi = key_run(T.min(i0 + r, n - 1), n, nk, w)
                        for u in T.vectorized(KB):
                            red[u] = T.float32(NEG_INF)
                        for jb in range(steps(cnt, KB)):
                            for u in T.vectorized(KB):
                                red[u] = T.max(red[u], T.Select(
                                    (lo + jb * KB + u >= row_lo) & (lo + jb * KB + u < row_hi),
                                    sc[r, jb * KB + u], T.float32(NEG_INF)))
                        m_new = T.max(m[r], T.max(T.max(T.max(red[0], red[1]), T.max(red[2], red[3])),
                                                  T.max(T.max(red[4], red[5]), T.max(red[6], red[7]))))
                        corr[r] = fast_exp(m[r] - m_new)
                        for u in T.vectorized(KB):
                            red[u] = T.float32(0)
                        for jb in range(steps(cnt, KB)):
                            for u in T.vectorized(KB):
                                # Select, not if_then_else: TVM scalarises a vector if_then_else
                                sc[r, jb * KB + u] = T.Select(
                                    (lo + jb * KB + u >= row_lo) & (lo + jb * KB + u < row_hi),
                                    fast_exp(sc[r, jb * KB + u] - m_new), T.float32(0))
                                red[u] = red[u] + sc[r, jb * KB + u]
                        l[r] = l[r] * corr[r] + (red[0] + red[1] + red[2] + red[3] + red[4] + red[5] + red[6] + red[7])
                        m[r] = m_new
                        for cc in T.vectorized(c):
                            acc[r, cc] = acc[r, cc] * corr[r]
                        if share == "map":
                            for cc in T.vectorized(c):
                                acc_u[r, cc] = acc_u[r, cc] * corr[r]
                    # acc += p·V, cw channels at a time: each value vector loaded once for all rows
                    for ch in range(c // cw):
                        for r in T.unroll(QB):
                            for u in T.vectorized(cw):
                                pv[r, u] = T.float32(0)
                        for j in range(skip, cnt):
                            for r in T.unroll(QB):
                                for u in T.vectorized(cw):
                                    pv[r, u] = pv[r, u] + sc[r, j] * kv[1, b, h, (base + j) * c + ch * cw + u]
                        for r in T.unroll(QB):
                            for u in T.vectorized(cw):
                                acc[r, ch * cw + u] = acc[r, ch * cw + u] + pv[r, u]
                        if share == "map":
                            for r in T.unroll(QB):
                                for u in T.vectorized(cw):
                                    pv[r, u] = T.float32(0)
                            for j in range(skip, cnt):
                                for r in T.unroll(QB):
                                    for u in T.vectorized(cw):
                                        pv[r, u] = pv[r, u] + sc[r, j] * kv[1, b + half, h, (base + j) * c + ch * cw + u]
                            for r in T.unroll(QB):
                                for u in T.vectorized(cw):
                                    acc_u[r, ch * cw + u] = acc_u[r, ch * cw + u] + pv[r, u]
            for r in range(QB):
                if i0 + r < n:
                    for cc in T.vectorized(c):
                        out[b, h, i0 + r, cc] = acc[r, cc] / l[r]
                    if share == "map":
                        for cc in T.vectorized(c):
                            out[b + half, h, i0 + r, cc] = acc_u[r, cc] / l[r]
                    if share == "output":
                        for cc in T.vectorized(c):
                            out[b + half, h, i0 + r, cc] = acc[r, cc] / l[r]

    return attention.with_attr("tirx.is_scheduled", True)


@lru_cache(maxsize=None)
def _attention_gpu(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int, share: str | None,
                   threads: int = 64, bound: bool = True):
    """bound=False: the same loops unbound, so that tests can run the GPU variant on a CPU."""
    half = NB // 2 if share else NB
    rows = half * H * n
    blocks = (rows + threads - 1) // threads
    outer = (lambda e: T.thread_binding(e, thread="blockIdx.x")) if bound else T.serial  # noqa: E731
    inner = (lambda e: T.thread_binding(e, thread="threadIdx.x")) if bound else T.serial  # noqa: E731

    @T.prim_func(private=True)
    def attention(q: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32"),
                  kv: T.Buffer((T.int64(2), T.int64(NB), T.int64(H), T.int64(cache_row(L, c))), "float32"),
                  win: T.Buffer((T.int64(S), T.int64(H), T.int64(S)), "int32"),
                  geom: T.Buffer((T.int64(S), T.int64(2)), "int32"),
                  out: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for bx in outer(blocks):
            for tx in inner(threads):
                r = bx * threads + tx
                if r < rows:
                    b = r // (H * n)
                    h = r // n % H
                    i = r % n
                    m = T.decl_buffer((1,), "float32", scope="local")
                    l = T.decl_buffer((1,), "float32", scope="local")
                    s = T.decl_buffer((1,), "float32", scope="local")
                    acc = T.decl_buffer((c,), "float32", scope="local")
                    acc_u = T.decl_buffer((c,), "float32", scope="local")
                    m[0] = T.float32(NEG_INF)
                    l[0] = T.float32(0)
                    for cc in range(c):
                        acc[cc] = T.float32(0)
                        acc_u[cc] = T.float32(0)
                    for ks in range(qs + 1):
                        lo, hi = key_run(i, n, geom[ks, 1], win[qs, h, ks])
                        beg = geom[ks, 0]
                        for j in range(lo, hi):
                            s[0] = T.float32(0)
                            for cc in range(c):
                                s[0] = s[0] + q[b, h, i, cc] * kv[0, b, h, key_at(beg + j, cc, c)]
                            m_new = T.max(m[0], s[0])
                            corr = T.exp(m[0] - m_new)
                            p = T.exp(s[0] - m_new)
                            l[0] = l[0] * corr + p
                            for cc in range(c):
                                acc[cc] = acc[cc] * corr + p * kv[1, b, h, (beg + j) * c + cc]
                            if share == "map":
                                for cc in range(c):
                                    acc_u[cc] = acc_u[cc] * corr + p * kv[1, b + half, h, (beg + j) * c + cc]
                            m[0] = m_new
                    for cc in range(c):
                        out[b, h, i, cc] = acc[cc] / l[0]
                    if share == "map":
                        for cc in range(c):
                            out[b + half, h, i, cc] = acc_u[cc] / l[0]
                    if share == "output":
                        for cc in range(c):
                            out[b + half, h, i, cc] = acc[cc] / l[0]

    return attention.with_attr("tirx.is_scheduled", True)
