"""Attention of one scale against a block's preallocated KV cache, computing only kept pairs.

One kernel covers the three cases of a plan:
- dense: every key of every earlier scale;
- MDWA: per (head, key scale) a window w from the plan's table; query i of scale q keeps keys j
  of scale k with |i·n_k − j·n_q| < w·n_q (compiler/compress/mdwa.py), so each query walks one
  contiguous run of keys per key scale; w = 0 drops the key scale, w < 0 keeps it dense;
- ASC: under CFG the conditional half computes the softmax weights once; "map" applies them to
  both halves' values, "output" copies the conditional output to the unconditional half, and
  "cond" (output where the unconditional keys are never read again) computes the conditional
  half alone: the graph then skips that half's projections too.

Cache layout, per block: 2 × NB × H × (⌈L/8⌉·8·c) for L places, keys in panels of 8 (panel t
holds keys 8t … 8t+7, channel-major: c × 8) and values row-major (V[b, h] is L × c). Panels give
the GPU kernels whole 16-byte loads of consecutive keys (a CUDA tile stages them as they are,
OpenCL reads 4 keys a load); the CPU kernel reads single keys. Each scale starts at a panel
boundary (scale_slots: d16's 680 tokens take 720 places), so a dense run of keys starts at a
panel; a windowed run starts at the panel holding its first key.

CPU: a block is 8 query rows of a (batch, head), one per vector lane; several blocks go to a
parallel task (a task allocates its buffers from TVM's workspace pool once, not once per block:
the pool's allocate and free were ~14 % of a narrow-window call). The block lists its keys once:
per key scale the union of its rows' runs (runs grow with the row: the first row's start to the
last row's end), each key with a mask per row, 0 on the row's run and −3e38 off it. Scores come
7 listed keys a step, across key scales: per channel, one vector of the 8 rows' q times one
broadcast of each key's channel (7 accumulators, 2 q vectors and 7 broadcasts fill AVX2's 16
registers; with 8 keys LLVM spilled an accumulator, and the spill's store and reload sat in the
FMA chain). q is transposed once per block, 8 × 8 tiles by register shuffles, and the next
block's q is prefetched. Then one exact softmax per row, lane-wise across the rows (maximum and
sum need no horizontal reductions), weights by a vectorised polynomial exp, and out = p·V in
passes of 4 rows × 16 channels that share each value load. Rows as lanes because the keys a block computes then follow its rows'
runs to the key: at d16's last scale with windows of 4, 1.30× the kept pairs (counted), where
keys as lanes (16 keys of a panel per step, the kernel before) computed whole panels, 2.16×.
Not an online softmax: a block's scores fit the caches (L × 8 floats, 22 KB at d16), and
holding them lets the 8-bit attention round the final weights without walking the keys twice.
The GPU kernels keep the online softmax: their shared memory holds a tile, not a row.

CUDA: one thread block per (batch, head, tile of 16 query rows), 4 threads per row. The block
walks each key scale's union run in tiles of 16 keys staged in shared memory (keys as their
panels, values row-major, both read once per block instead of once per row), computes a 16 × 16
score tile, the online-softmax rescale per row, and acc += p·V with each thread holding a
quarter of the row's channels. OpenCL (Mali, whose local memory is ordinary memory): one thread
per row, 4 keys per step in 16-byte loads from their panel (_attention_rows).
"""
from __future__ import annotations

from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

from schedules.kv_layout import KB, cache_row, key_at

NEG_INF = -3.0e38
RB = 8                # query rows per CPU block: the 8 lanes of a vector
KJ = 7                # keys per score step: 7 accumulators, 2 q vectors and 7 broadcasts fill AVX2's 16 registers
PR = 4                # rows per p·V pass: 4 rows × 16 channels, 8 accumulators share each value load
TASKS = 64            # parallel tasks to aim for: enough to balance a board's cores, few workspace allocations


def band_run(i, n, nk, w):
    """First and one-past-last kept key of query i (of n) in a key scale of nk tokens under a
    window w ≥ 0: lo = ceil((i·nk − w·n + 1)/n), hi = ⌊(i·nk + w·n − 1)/n⌋ + 1, clipped."""
    return (T.max(0, T.floordiv(i * nk - w * n + n, n)),
            T.min(nk, T.floordiv(i * nk + w * n - 1, n) + 1))


def key_run(i, n, nk, w):
    """band_run, and for w < 0 (dense) all keys."""
    lo, hi = band_run(i, n, nk, w)
    return T.if_then_else(w < 0, 0, lo), T.if_then_else(w < 0, nk, hi)


def union_run(i0, rows, n, nk, w, first):
    """The keys that query rows i0 … i0+rows−1 (clipped to n) keep, together, in a key scale of
    nk tokens whose first cache place `first` starts a panel: runs grow with i, so their union
    runs from the first row's lo to the last row's hi. Returns (skip, lo, cnt): cnt keys from
    key lo, the start of the panel that holds the first kept key (`skip` keys before it);
    cnt ≤ skip when no key is kept."""
    run_lo = key_run(i0, n, nk, w)[0]
    skip = (first + run_lo) % KB
    lo = run_lo - skip
    return skip, lo, key_run(T.min(i0 + rows - 1, n - 1), n, nk, w)[1] - lo


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


@lru_cache(maxsize=None)  # one parse per shape
def kv_write(NB: int, H: int, n: int, c: int, L: int, begin: int, cache_nb: int | None = None):
    """Write one scale's k, v (NB×H×n×c) at place `begin` of a cache of L places, in place; into
    the first NB batch rows of a cache of `cache_nb` (ASC "cond": the conditional half only)."""
    CB = NB if cache_nb is None else cache_nb

    @T.prim_func(private=True, s_tir=True)
    def write_kv(kv: T.Buffer((T.int64(2), T.int64(CB), T.int64(H), T.int64(cache_row(L, c))), "float32"),
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


def signature(NB: int, H: int, n: int, c: int, L: int, S: int, share: str | None = None):
    """The attention kernels' parameters: q, the cache, win, geom and out (each its own buffer);
    for ASC "cond", q and out hold the conditional half's NB/2 batch rows only."""
    i64 = T.int64
    rows = lambda: T.Buffer((i64(query_rows(NB, share)), i64(H), i64(n), i64(c)), "float32")  # noqa: E731
    return (rows(), T.Buffer((i64(2), i64(NB), i64(H), i64(cache_row(L, c))), "float32"),
            T.Buffer((i64(S), i64(H), i64(S)), "int32"), T.Buffer((i64(S), i64(2)), "int32"), rows())


def query_rows(NB: int, share: str | None) -> int:
    """Batch rows of q and out: all NB, or the conditional half for ASC "cond"."""
    return NB // 2 if share == "cond" else NB


def windowed_attention(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int,
                       share: str | None = None, gpu: str | bool = False, map_bits: int | None = None):
    """out NB×H×n×c = softmax(q·kᵀ over kept keys)·v for query scale `qs`, on a cache of L places
    (NB batch rows: both CFG halves).

    Tables: win S×H×S int32 (window per query scale, head, key scale; −1 dense, 0 dropped) and
    geom S×2 int32 (scale_slots: first place and token count of each scale). `share`: None, "map",
    "output", or "cond": "output" where the unconditional half's keys are never read again (this
    and every later query scale of the block share), so that half is not computed at all: q and
    out hold the conditional half's NB/2 rows (query_rows), the cache still both halves. `gpu`:
    False (CPU), "cuda" (the tiled kernel) or another GPU API (one thread per row). `map_bits`: a
    plan's 8-bit attention (the CPU kernel, or the per-row one on GPUs)."""
    if map_bits is not None and gpu:
        return _attention_rows(NB, H, n, c, L, S, qs, share, map_bits=map_bits)
    if gpu:
        return (_attention_tiled if gpu == "cuda" else _attention_rows)(NB, H, n, c, L, S, qs, share)
    return _attention_cpu(NB, H, n, c, L, S, qs, share, map_bits)


@lru_cache(maxsize=None)
def _attention_cpu(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int, share: str | None,
                   map_bits: int | None = None):
    """The CPU kernel (module docstring). map_bits=8: a plan's 8-bit attention, rounded as the
    per-row kernel does it (_attention_rows): the weights e/l, e = exp(s − max), are put on the
    row's grid before they multiply v."""
    half = NB // 2 if share else NB
    blocks = (n + RB - 1) // RB                  # query blocks per (batch, head)
    per = max(1, min(blocks, half * H * blocks // TASKS))   # blocks per parallel task
    chunks = (blocks + per - 1) // per
    cw = 16 if c % 16 == 0 else (8 if c % 8 == 0 else c)  # channels per p·V pass
    quantized = map_bits is not None
    levels = float(2 ** map_bits - 1) if quantized else 1.0

    @T.macro
    def gather_rows(q, qt, b, h, i0):
        """qt[:, u] = q row i0+u (the last row again past n), one float at a time."""
        for cc in range(c):
            for u in T.vectorized(RB):
                qt[cc, u] = q[b, h, T.min(i0 + u, n - 1), cc]

    @T.macro
    def load_q(q, qt, b, h, i0):
        """qt = the block's q, transposed: whole blocks as 8 × 8 tiles in registers (the gather
        took ~10 % of a narrow-window call), the last one gathered. The next block's rows are
        prefetched, one 64-byte line at a time: their loads waited on memory."""
        if i0 + 2 * RB <= n:
            for r in range(RB):
                for x in range((c + 15) // 16):
                    T.evaluate(T.call_intrin("void", "tirx.prefetch",
                                             T.address_of(q[b, h, i0 + RB + r, x * 16]), 0, 3, 1))
        if c % RB == 0:
            if i0 + RB <= n:
                for m in range(c // RB):
                    for k in T.unroll(RB):
                        qt[m * RB + k, T.ramp(0, 1, RB)] = T.Shuffle(
                            [q[b, h, i0 + r, T.ramp(m * RB, 1, RB)] for r in range(RB)],
                            [r * RB + k for r in range(RB)])
            else:
                gather_rows(q, qt, b, h, i0)
        else:
            gather_rows(q, qt, b, h, i0)

    @T.macro
    def score_keys(qt, kv, sc, acc, top, kpl, b, h, p0):
        """Scores of the block's rows (lanes) against the listed keys p0 … p0+KJ−1 (cache places
        kpl), added to their masks in sc: per channel one q vector for all KJ keys and one
        broadcast per key."""
        for t in T.unroll(KJ):
            for u in T.vectorized(RB):
                acc[t, u] = T.float32(0)
        for cc in range(c):
            for t in T.unroll(KJ):
                for u in T.vectorized(RB):
                    acc[t, u] = acc[t, u] + qt[cc, u] * kv[0, b, h, key_at(kpl[p0 + t], cc, c)]
        for t in T.unroll(KJ):
            for u in T.vectorized(RB):
                sc[p0 + t, u] = sc[p0 + t, u] + acc[t, u]
                top[u] = T.max(top[u], sc[p0 + t, u])

    @T.macro
    def weighted_values(kv, sc, kpl, off, pv, rl, out, b, h, i0, g):
        """out rows i0+g … i0+g+PR−1 of batch row b = (Σ p·v over the listed keys)·rl, cw channels
        a pass, each value vector loaded once for the PR rows (ASC "output": copied to b + half)."""
        for ch in range(c // cw):
            for r in T.unroll(PR):
                for u in T.vectorized(cw):
                    pv[r, u] = T.float32(0)
            for p in range(off[0]):
                for r in T.unroll(PR):
                    for u in T.vectorized(cw):
                        pv[r, u] = pv[r, u] + sc[p, g + r] * kv[1, b, h, kpl[p] * c + ch * cw + u]
            for r in T.unroll(PR):
                if i0 + g + r < n:
                    for u in T.vectorized(cw):
                        out[b, h, i0 + g + r, ch * cw + u] = pv[r, u] * rl[g + r]
                    if share == "output":
                        for u in T.vectorized(cw):
                            out[b + half, h, i0 + g + r, ch * cw + u] = pv[r, u] * rl[g + r]

    Q, Cache, Windows, Geom, Out = signature(NB, H, n, c, L, S, share)

    @T.prim_func(private=True)
    def attention(q: Q, kv: Cache, win: Windows, geom: Geom, out: Out):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for task in T.parallel(half * H * chunks):
            b = task // (H * chunks)
            h = task // chunks % H
            qt = T.decl_buffer((c, RB), "float32", scope="local")      # the block's q, a row per lane
            kpl = T.decl_buffer((L + KJ,), "int32", scope="local")     # the block's keys: cache places
            sc = T.decl_buffer((L + KJ, RB), "float32", scope="local")  # their masks, scores, weights
            lov = T.decl_buffer((RB,), "int32", scope="local")         # each row's run in a key scale
            hiv = T.decl_buffer((RB,), "int32", scope="local")
            off = T.decl_buffer((1,), "int32", scope="local")          # keys listed so far
            acc = T.decl_buffer((KJ, RB), "float32", scope="local")
            top = T.decl_buffer((RB,), "float32", scope="local")       # each row's largest score
            lsum = T.decl_buffer((RB,), "float32", scope="local")
            pv = T.decl_buffer((PR, cw), "float32", scope="local")
            # a task's blocks reuse its buffers: each task allocates them from TVM's workspace pool
            for blk in range(T.min(per, blocks - task % chunks * per)):
                i0 = (task % chunks * per + blk) * RB
                load_q(q, qt, b, h, i0)
                # 1. the block's keys in one list: per key scale, the union of its rows' runs. sc
                # starts as each row's mask, 0 on its run and −3e38 off it: adding the score masks
                # it (a Select stored over the score became a masked store, microcoded on AMD)
                off[0] = 0
                for ks in range(qs + 1):
                    w = win[qs, h, ks]
                    nk = geom[ks, 1]
                    # each row's run, the 8 rows at once (inline: a binding inside a vectorised
                    # loop takes the last lane's value, docs/tvm-0.27-findings.md)
                    for u in T.vectorized(RB):
                        lov[u] = 0
                        hiv[u] = T.Select(w < 0, nk, 0)     # dense, or dropped (w = 0)
                    if w > 0:
                        for u in T.vectorized(RB):
                            lov[u] = band_run(T.min(i0 + u, n - 1), n, nk, w)[0]
                            hiv[u] = band_run(T.min(i0 + u, n - 1), n, nk, w)[1]
                    for j in range(lov[0], hiv[RB - 1]):    # runs grow with the row
                        kpl[off[0] + j - lov[0]] = geom[ks, 0] + j
                        for u in T.vectorized(RB):
                            sc[off[0] + j - lov[0], u] = T.Select((j >= lov[u]) & (j < hiv[u]),
                                                                  T.float32(0), T.float32(NEG_INF))
                    off[0] = off[0] + T.max(hiv[RB - 1] - lov[0], 0)
                for t in range(KJ):     # the last step's spare places: a real key, masked
                    kpl[off[0] + t] = T.if_then_else(off[0] > 0, kpl[T.max(off[0] - 1, 0)], 0)
                    for u in T.vectorized(RB):
                        sc[off[0] + t, u] = T.float32(NEG_INF)
                # 2. scores, KJ listed keys a step, across key scales
                for u in T.vectorized(RB):
                    top[u] = T.float32(NEG_INF)
                for st in range((off[0] + KJ - 1) // KJ):
                    score_keys(qt, kv, sc, acc, top, kpl, b, h, st * KJ)
                # 3. softmax of each row (lane) over its kept keys: e = exp(s − max), 0 where masked
                for u in T.vectorized(RB):
                    lsum[u] = T.float32(0)
                for p in range(off[0]):
                    for u in T.vectorized(RB):
                        sc[p, u] = T.Select(sc[p, u] > T.float32(NEG_INF / 2), fast_exp(sc[p, u] - top[u]),
                                            T.float32(0))
                        lsum[u] = lsum[u] + sc[p, u]
                if quantized:
                    # the weights e·(1/l) on the row's grid: the largest is 1/l, so the grid's unit
                    # is (1/l)/levels and a weight's level round(levels·e), no division
                    for u in T.vectorized(RB):
                        top[u] = T.max(T.float32(1) / (lsum[u] * T.float32(levels)), T.float32(1e-12))
                        lsum[u] = T.float32(1)       # the rounded weights already carry 1/l
                    for p in range(off[0]):
                        for u in T.vectorized(RB):
                            sc[p, u] = T.nearbyint(sc[p, u] * T.float32(levels)) * top[u]
                for u in T.vectorized(RB):
                    lsum[u] = T.float32(1) / lsum[u]
                # 4. out = p·V / l, PR rows at a time (ASC "map": the same weights on the other
                # half's values; "output": the same output)
                for g in range(RB // PR):
                    weighted_values(kv, sc, kpl, off, pv, lsum, out, b, h, i0, g * PR)
                    if share == "map":
                        weighted_values(kv, sc, kpl, off, pv, lsum, out, b + half, h, i0, g * PR)

    return attention.with_attr("tirx.is_scheduled", True)


def rows_launch(NB: int, H: int, n: int, share: str | None, threads: int = 64) -> tuple[int, int]:
    """(blocks, threads) of the per-row kernel: a thread per query row of the half it computes."""
    rows = (NB // 2 if share else NB) * H * n
    return (rows + threads - 1) // threads, threads


@lru_cache(maxsize=None)
def _attention_rows(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int, share: str | None,
                    threads: int = 64, bound: bool | str = True, vector: bool = True,
                    map_bits: int | None = None):
    """The OpenCL kernel (and CUDA's per-row comparison in gpu_bench): one thread per query row,
    no shared memory, so nothing relies on a large local memory (Mali's is ordinary memory).

    A step scores KG = 4 consecutive keys of the row's run: each channel of them is one 16-byte
    load from the key's panel, each 4 channels of q another, 16 multiply-adds for 5 loads; one
    softmax rescale per step, then p·V by 16-byte loads of value rows. A step starts at a
    multiple of 4 places (scales start at panels), and the keys before the run or after it are
    masked; their values are never read (a padding place may hold anything). The buffers are
    read through int32-indexed views: 64-bit index arithmetic is slow on GPUs, and a cache is far
    below 2³¹ floats. vector=False: one key and one float per load (the previous kernel's loads).

    map_bits=8: a plan's 8-bit attention (quant.attention_bits; q, k and v arrive already on
    their per-token grids): each row's softmax weights are rounded to the unsigned grid of the
    row's largest weight, as compiler/compress/quant.py's quantize_map does. The grid needs the
    row's final max and sum, so the row is walked twice: scores, max and sum; then scores again,
    the weights rounded, times v. It runs on every target (CPUs too: bound="cpu").

    bound: True (GPU threads), "cpu" (blocks of rows as parallel CPU tasks), False (serial
    loops, so that tests run the GPU variant on a CPU)."""
    half = NB // 2 if share else NB
    rows = half * H * n
    blocks = rows_launch(NB, H, n, share, threads)[0]
    KG = KB // 2 if vector else 1                 # keys per step: one 16-byte load of a panel
    VW = 4 if vector and c % 4 == 0 else 1        # channels per load of q and of a value row
    R = cache_row(L, c)
    quantized = map_bits is not None              # a Python bool: the branches below are static
    levels = float(2 ** map_bits - 1) if quantized else 1.0
    assert 2 * NB * H * R < 2 ** 31, "the int32 views need a cache below 2³¹ floats"
    outer = (lambda e: T.thread_binding(e, thread="blockIdx.x")) if bound is True else (  # noqa: E731
        T.parallel if bound == "cpu" else T.serial)
    inner = (lambda e: T.thread_binding(e, thread="threadIdx.x")) if bound is True else T.serial  # noqa: E731

    @T.macro
    def score(qf, kvf, sc, qv, qrow, keys, grp, first, lo, hi):
        """sc = q·k of the KG keys at places grp·KG …, keys first … of their scale; −∞ outside
        [lo, hi). The panel offset is written so that TVM can prove it a multiple of KG (vector
        loads): lane grp % (KB/KG) of panel grp // (KB/KG)."""
        for e in T.vectorized(KG):
            sc[e] = T.float32(0)
        for g in range(c // VW):
            for u in T.vectorized(VW):
                qv[u] = qf[qrow + g * VW + u]
            for u in T.unroll(VW):
                for e in T.vectorized(KG):
                    sc[e] = sc[e] + qv[u] * kvf[keys + grp // (KB // KG) * (KB * c) + (g * VW + u) * KB
                                                + grp % (KB // KG) * KG + e]
        for e in T.unroll(KG):
            sc[e] = T.Select((first + e >= lo) & (first + e < hi), sc[e], T.float32(NEG_INF))

    @T.macro
    def add_value(kvf, acc, acc_u, p, vals, vals_u, place):
        """acc += p·v of the key at `place` (ASC "map": acc_u += p·v of the other half)."""
        for g in range(c // VW):
            for u in T.vectorized(VW):
                acc[g * VW + u] = acc[g * VW + u] + p * kvf[vals + place * c + g * VW + u]
                if share == "map":
                    acc_u[g * VW + u] = acc_u[g * VW + u] + p * kvf[vals_u + place * c + g * VW + u]

    Q, Cache, Windows, Geom, Out = signature(NB, H, n, c, L, S, share)

    @T.prim_func(private=True)
    def attention(q: Q, kv: Cache, win: Windows, geom: Geom, out: Out):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        qf = T.decl_buffer((query_rows(NB, share) * H * n * c,), "float32", data=q.data)
        kvf = T.decl_buffer((2 * NB * H * R,), "float32", data=kv.data)
        outf = T.decl_buffer((query_rows(NB, share) * H * n * c,), "float32", data=out.data)
        for bx in outer(blocks):
            for tx in inner(threads):
                if bx * threads + tx < rows:
                    # aliases, not variables: offsets kept as expressions keep the loads vectors
                    r = T.meta_var(bx * threads + tx)
                    h = T.meta_var(r // n % H)
                    i = T.meta_var(r % n)
                    qrow = T.meta_var(r * c)                            # q and out of row r
                    keys = T.meta_var(r // n * R)                       # keys row of (b, h)
                    vals = T.meta_var((NB * H + r // n) * R)            # values row of (b, h)
                    vals_u = T.meta_var(((NB + half) * H + r // n) * R)  # ASC "map": the other half's
                    m = T.decl_buffer((1,), "float32", scope="local")
                    l = T.decl_buffer((1,), "float32", scope="local")
                    mx = T.decl_buffer((1,), "float32", scope="local")
                    corr = T.decl_buffer((1,), "float32", scope="local")
                    p = T.decl_buffer((1,), "float32", scope="local")
                    sc = T.decl_buffer((KG,), "float32", scope="local")
                    qv = T.decl_buffer((VW,), "float32", scope="local")
                    acc = T.decl_buffer((c,), "float32", scope="local")
                    acc_u = T.decl_buffer((c if share == "map" else 1,), "float32", scope="local")
                    m[0] = T.float32(NEG_INF)
                    l[0] = T.float32(0)
                    for g in range(c // VW):
                        for u in T.vectorized(VW):
                            acc[g * VW + u] = T.float32(0)
                            if share == "map":
                                acc_u[g * VW + u] = T.float32(0)
                    for ks in range(qs + 1):
                        lo, hi = key_run(i, n, geom[ks, 1], win[qs, h, ks])
                        for step in range(lo // KG, (hi + KG - 1) // KG):
                            grp = T.meta_var(geom[ks, 0] // KG + step)   # places grp·KG …
                            score(qf, kvf, sc, qv, qrow, keys, grp, step * KG, lo, hi)
                            mx[0] = m[0]
                            for e in T.unroll(KG):
                                mx[0] = T.max(mx[0], sc[e])
                            corr[0] = T.exp(m[0] - mx[0])
                            l[0] = l[0] * corr[0]
                            if quantized:   # first walk: the max and the sum only
                                for e in T.unroll(KG):
                                    l[0] = l[0] + T.Select(sc[e] > T.float32(NEG_INF), T.exp(sc[e] - mx[0]),
                                                           T.float32(0))
                            else:
                                for g in range(c // VW):
                                    for u in T.vectorized(VW):
                                        acc[g * VW + u] = acc[g * VW + u] * corr[0]
                                        if share == "map":
                                            acc_u[g * VW + u] = acc_u[g * VW + u] * corr[0]
                                for e in T.unroll(KG):
                                    if (step * KG + e >= lo) & (step * KG + e < hi):
                                        p[0] = T.exp(sc[e] - mx[0])
                                        l[0] = l[0] + p[0]
                                        add_value(kvf, acc, acc_u, p[0], vals, vals_u, grp * KG + e)
                            m[0] = mx[0]
                    if quantized:
                        # the weights are e·(1/l), e = exp(s − max); the largest is 1/l, so the
                        # grid's unit is (1/l)/levels and a weight's level round(levels·e)
                        corr[0] = T.max(T.float32(1) / (l[0] * T.float32(levels)), T.float32(1e-12))
                        for ks in range(qs + 1):
                            lo, hi = key_run(i, n, geom[ks, 1], win[qs, h, ks])
                            for step in range(lo // KG, (hi + KG - 1) // KG):
                                grp = T.meta_var(geom[ks, 0] // KG + step)
                                score(qf, kvf, sc, qv, qrow, keys, grp, step * KG, lo, hi)
                                for e in T.unroll(KG):
                                    if (step * KG + e >= lo) & (step * KG + e < hi):
                                        p[0] = T.nearbyint(T.exp(sc[e] - m[0]) * T.float32(levels)) * corr[0]
                                        add_value(kvf, acc, acc_u, p[0], vals, vals_u, grp * KG + e)
                        l[0] = T.float32(1)    # the rounded weights already carry 1/l
                    for g in range(c // VW):
                        for u in T.vectorized(VW):
                            outf[qrow + g * VW + u] = acc[g * VW + u] / l[0]
                            if share == "map":
                                outf[(half * H * n + r) * c + g * VW + u] = acc_u[g * VW + u] / l[0]
                            if share == "output":
                                outf[(half * H * n + r) * c + g * VW + u] = acc[g * VW + u] / l[0]

    return attention.with_attr("tirx.is_scheduled", True)


GPU_ROWS, GPU_KEYS, ROW_THREADS = 16, 16, 4   # CUDA: query rows per block, keys per shared tile, threads per row


@lru_cache(maxsize=None)
def _attention_tiled(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int, share: str | None,
                     bound: bool = True, QT: int = GPU_ROWS, KT: int = GPU_KEYS, TPR: int = ROW_THREADS,
                     vector_keys: bool | None = None, vector_values: bool | None = None):
    """The CUDA kernel (module docstring). Each phase is a loop over the block's threads, with a
    barrier between phases; bound=False leaves those loops serial, keeps each thread's state in
    its own slot and runs on a CPU, so tests check the same arithmetic here.

    A thread scores kpt consecutive keys of its row (4 at a time from a panel: one 16-byte
    shared load) and holds the row's channels in 4-float groups spaced TPR groups apart (the
    row's threads read adjacent groups of a value row: no bank conflicts). vector_keys=False,
    vector_values=False: one float at a time (also what shapes that do not split into 4-float
    groups get). The default (None) is 16-byte loads, except for ASC "map": on an H100 at d16's
    last scale the 16-byte loads took 1.35× the time of single floats there (130 against 96 µs;
    0.75–0.87× for the other cases; schedules/gpu_bench.py), and the same on an H200. ncu there:
    the 16-byte loads remove the shared-memory bank conflicts but the warps wait 2.65× longer
    on global loads, at 6 % occupancy (map runs the conditional half's blocks only)."""
    vector_keys = share != "map" if vector_keys is None else vector_keys
    vector_values = share != "map" if vector_values is None else vector_values
    assert KT % KB == 0 and KT % TPR == 0, "a key tile is whole panels, split evenly between a row's threads"
    half = NB // 2 if share else NB
    tiles = (n + QT - 1) // QT
    threads = QT * TPR
    kpt = KT // TPR                                # keys per thread (scores)
    KV = 4 if vector_keys and kpt % 4 == 0 else 1  # keys per shared load
    VW = 4 if vector_values and c % (4 * TPR) == 0 else 1   # channels per shared load (p·V)
    cpt = (c + VW * TPR - 1) // (VW * TPR)         # channel groups per thread
    P = KB * c + (8 if KV > 1 else 0)              # panel stride in shared memory: the next panel 2 banks on
    cs, ps = c | 1, KT + 1                         # odd row strides: a warp's 8 rows hit 8 banks
    NT = 1 if bound else threads                   # per-thread state: registers, or one slot per thread
    slot = (lambda tx: 0) if bound else (lambda tx: tx)  # noqa: E731
    blocks = (lambda e: T.thread_binding(e, thread="blockIdx.x")) if bound else T.serial  # noqa: E731
    each_thread = (lambda e: T.thread_binding(e, thread="threadIdx.x")) if bound else T.serial  # noqa: E731
    shared = "shared" if bound else "global"
    up = lambda a, b: (a + b - 1) // b  # noqa: E731
    channel = lambda k, part, u: (k * TPR + part) * VW + u  # noqa: E731
    # a value read for a channel past c (only when c does not split into TPR threads) reads a
    # copy of the last one, never written out
    v_channel = channel if c % TPR == 0 else (lambda k, part, u: T.min(channel(k, part, u), c - 1))  # noqa: E731

    @T.macro
    def barrier():
        if bound:
            T.tvm_storage_sync("shared")

    Q, Cache, Windows, Geom, Out = signature(NB, H, n, c, L, S, share)

    @T.prim_func(private=True)
    def attention(q: Q, kv: Cache, win: Windows, geom: Geom, out: Out):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for bx in blocks(half * H * tiles):
            b = bx // (H * tiles)
            h = bx // tiles % H
            i0 = bx % tiles * QT
            q_sh = T.decl_buffer((QT * cs,), "float32", scope=shared)
            k_sh = T.decl_buffer((KT // KB * P,), "float32", scope=shared)  # panels of KB keys, as in the cache
            v_sh = T.decl_buffer((KT * c,), "float32", scope=shared)
            vu_sh = T.decl_buffer((KT * c if share == "map" else 1,), "float32", scope=shared)
            s_sh = T.decl_buffer((QT * ps,), "float32", scope=shared)      # scores of the tile
            p_sh = T.decl_buffer((QT * ps,), "float32", scope=shared)      # their weights
            l_sh = T.decl_buffer((threads,), "float32", scope=shared)
            m = T.decl_buffer((NT,), "float32", scope="local")
            l = T.decl_buffer((NT,), "float32", scope="local")             # the sum over this thread's keys
            acc = T.decl_buffer((NT, cpt * VW), "float32", scope="local")    # row-thread slot, channel
            acc_u = T.decl_buffer((NT, cpt * VW), "float32", scope="local")   # ASC "map": the other half
            for tx in each_thread(threads):
                m[slot(tx)] = T.float32(NEG_INF)
                l[slot(tx)] = T.float32(0)
                for k in T.unroll(cpt * VW):
                    acc[slot(tx), k] = T.float32(0)
                    acc_u[slot(tx), k] = T.float32(0)
                for e in range(up(QT * c, threads)):
                    if tx + e * threads < QT * c:
                        r = (tx + e * threads) // c
                        q_sh[r * cs + (tx + e * threads) % c] = q[b, h, T.min(i0 + r, n - 1), (tx + e * threads) % c]
            for ks in range(qs + 1):
                w = win[qs, h, ks]
                nk = geom[ks, 1]
                skip, lo, cnt = union_run(i0, QT, n, nk, w, geom[ks, 0])   # once for the block's rows
                for t in range(up(cnt, KT)):   # an empty run (cnt ≤ skip) masks every key of its tile
                    first = geom[ks, 0] + lo + t * KT          # a panel boundary: KT keys are KT·c floats
                    barrier()
                    for tx in each_thread(threads):
                        for e in range(up(KT * c, threads)):
                            if tx + e * threads < KT * c:
                                x = tx + e * threads
                                key = t * KT + x // (KB * c) * KB + x % KB   # (panel, channel, lane) → key
                                if key >= skip and key < cnt:
                                    k_sh[x // (KB * c) * P + x % (KB * c)] = kv[0, b, h, first * c + x]
                                else:
                                    k_sh[x // (KB * c) * P + x % (KB * c)] = T.float32(0)
                                if t * KT + x // c >= skip and t * KT + x // c < cnt:  # values: (key, channel)
                                    v_sh[x] = kv[1, b, h, first * c + x]
                                    if share == "map":
                                        vu_sh[x] = kv[1, b + half, h, first * c + x]
                                else:
                                    v_sh[x] = T.float32(0)      # never 0 · (a stale NaN)
                                    if share == "map":
                                        vu_sh[x] = T.float32(0)
                    barrier()
                    for tx in each_thread(threads):
                        r = tx // TPR
                        # this thread's first key of the tile; an alias, not a variable, so that
                        # the key loads below stay 16-byte vectors
                        j0 = T.meta_var(tx % TPR * kpt)
                        row_lo, row_hi = key_run(T.min(i0 + r, n - 1), n, nk, w)
                        sl = T.decl_buffer((kpt,), "float32", scope="local")
                        for jj in T.unroll(kpt):
                            sl[jj] = T.float32(0)
                        for cc in range(c):
                            for k in T.unroll(kpt // KV):
                                for u in T.vectorized(KV):
                                    sl[k * KV + u] = sl[k * KV + u] + q_sh[r * cs + cc] * k_sh[
                                        (j0 + k * KV) // KB * P + cc * KB + (j0 + k * KV) % KB + u]
                        for jj in T.unroll(kpt):
                            s_sh[r * ps + j0 + jj] = T.Select(
                                (lo + t * KT + j0 + jj >= row_lo) & (lo + t * KT + j0 + jj < row_hi),
                                sl[jj], T.float32(NEG_INF))
                    barrier()
                    for tx in each_thread(threads):
                        r = tx // TPR
                        j0 = T.meta_var(tx % TPR * kpt)
                        mx = T.decl_buffer((1,), "float32", scope="local")
                        mx[0] = m[slot(tx)]
                        for j in range(KT):
                            mx[0] = T.max(mx[0], s_sh[r * ps + j])
                        corr = T.exp(m[slot(tx)] - mx[0])
                        l[slot(tx)] = l[slot(tx)] * corr
                        wt = T.decl_buffer((1,), "float32", scope="local")   # l sums it, not p_sh: no barrier
                        for jj in T.unroll(kpt):
                            wt[0] = T.Select(s_sh[r * ps + j0 + jj] > T.float32(NEG_INF),
                                             T.exp(s_sh[r * ps + j0 + jj] - mx[0]), T.float32(0))
                            p_sh[r * ps + j0 + jj] = wt[0]
                            l[slot(tx)] = l[slot(tx)] + wt[0]
                        for k in T.unroll(cpt * VW):
                            acc[slot(tx), k] = acc[slot(tx), k] * corr
                            if share == "map":
                                acc_u[slot(tx), k] = acc_u[slot(tx), k] * corr
                        m[slot(tx)] = mx[0]
                    barrier()
                    for tx in each_thread(threads):
                        r = tx // TPR
                        for j in range(KT):
                            for k in T.unroll(cpt):
                                for u in T.vectorized(VW):
                                    acc[slot(tx), k * VW + u] = (
                                        acc[slot(tx), k * VW + u]
                                        + p_sh[r * ps + j] * v_sh[j * c + v_channel(k, tx % TPR, u)])
                                    if share == "map":
                                        acc_u[slot(tx), k * VW + u] = (
                                            acc_u[slot(tx), k * VW + u]
                                            + p_sh[r * ps + j] * vu_sh[j * c + v_channel(k, tx % TPR, u)])
            barrier()
            for tx in each_thread(threads):
                l_sh[tx] = l[slot(tx)]
            barrier()
            for tx in each_thread(threads):
                r = tx // TPR
                if i0 + r < n:
                    tot = T.decl_buffer((1,), "float32", scope="local")
                    tot[0] = T.float32(0)
                    for part in range(TPR):
                        tot[0] = tot[0] + l_sh[r * TPR + part]
                    for k in T.unroll(cpt):
                        for u in T.unroll(VW):
                            if channel(k, tx % TPR, u) < c:
                                out[b, h, i0 + r, channel(k, tx % TPR, u)] = acc[slot(tx), k * VW + u] / tot[0]
                                if share == "map":
                                    out[b + half, h, i0 + r, channel(k, tx % TPR, u)] = (
                                        acc_u[slot(tx), k * VW + u] / tot[0])
                                if share == "output":
                                    out[b + half, h, i0 + r, channel(k, tx % TPR, u)] = (
                                        acc[slot(tx), k * VW + u] / tot[0])

    return attention.with_attr("tirx.is_scheduled", True)
