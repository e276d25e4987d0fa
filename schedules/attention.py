"""Attention of one scale against a block's preallocated KV cache, computing only kept pairs.

One kernel covers the three cases of a plan:
- dense: every key of every earlier scale;
- MDWA: per (head, key scale) a window w from the plan's table; query i of scale q keeps keys j
  of scale k with |i·n_k − j·n_q| < w·n_q (compiler/compress/mdwa.py), so each query walks one
  contiguous run of keys per key scale; w = 0 drops the key scale, w < 0 keeps it dense;
- ASC: under CFG the conditional half computes the softmax weights once; "map" applies them to
  both halves' values, "output" copies the conditional output to the unconditional half.
Softmax is online (running max and sum), so no score row is stored. One loop iteration (CPU:
a parallel task; GPU: a thread) per (batch, head, query) row; on the CPU the head-dim loops
are vectorised.
"""
from __future__ import annotations

from functools import lru_cache

from tvm.script import tirx as T

NEG_INF = -3.0e38


@lru_cache(maxsize=None)  # one parse and schedule per shape
def kv_write(NB: int, H: int, n: int, c: int, L: int, begin: int):
    """Write one scale's k, v (NB×H×n×c) at token `begin` of the cache (2×NB×H×L×c), in place."""

    @T.prim_func(private=True, s_tir=True)
    def write_kv(kv: T.Buffer((T.int64(2), T.int64(NB), T.int64(H), T.int64(L), T.int64(c)), "float32"),
                 k: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32"),
                 v: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for b, h, i, cc in T.grid(T.int64(NB), T.int64(H), T.int64(n), T.int64(c)):
            with T.sblock("write_k"):
                vb, vh, vi, vc = T.axis.remap("SSSS", [b, h, i, cc])
                kv[T.int64(0), vb, vh, vi + T.int64(begin), vc] = k[vb, vh, vi, vc]
        for b, h, i, cc in T.grid(T.int64(NB), T.int64(H), T.int64(n), T.int64(c)):
            with T.sblock("write_v"):
                vb, vh, vi, vc = T.axis.remap("SSSS", [b, h, i, cc])
                kv[T.int64(1), vb, vh, vi + T.int64(begin), vc] = v[vb, vh, vi, vc]

    return write_kv


@lru_cache(maxsize=None)  # one parse and schedule per shape
def windowed_attention(NB: int, H: int, n: int, c: int, L: int, S: int, qs: int,
                       share: str | None = None, gpu: bool = False):
    """out NB×H×n×c = softmax(q·kᵀ over kept keys)·v for query scale `qs`.

    Tables: win S×H×S int32 (window per query scale, head, key scale; −1 dense, 0 dropped) and
    geom S×2 int32 (first token and token count of each scale). `share`: None, "map" or "output"."""
    half = NB // 2 if share else NB
    rows = half * H * n
    lanes = 8 if c % 8 == 0 else 1      # q·k in 8 partial sums, so it vectorises (AVX2: one register)
    chunks = c // lanes
    # rows = blocks × threads: CPU one row per parallel task, GPU 64 threads per block
    threads = 64 if gpu else 1
    blocks = (rows + threads - 1) // threads
    if gpu:
        outer = lambda e: T.thread_binding(e, thread="blockIdx.x")  # noqa: E731
        inner = lambda e: T.thread_binding(e, thread="threadIdx.x")  # noqa: E731
    else:
        outer, inner = T.parallel, T.serial
    vec = T.serial if gpu else T.vectorized  # GPU: one thread per row, nothing to vectorise

    @T.prim_func(private=True)
    def attention(q: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32"),
                  kv: T.Buffer((T.int64(2), T.int64(NB), T.int64(H), T.int64(L), T.int64(c)), "float32"),
                  win: T.Buffer((T.int64(S), T.int64(H), T.int64(S)), "int32"),
                  geom: T.Buffer((T.int64(S), T.int64(2)), "int32"),
                  out: T.Buffer((T.int64(NB), T.int64(H), T.int64(n), T.int64(c)), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for bx in outer(blocks):
            for tx in inner(threads):
                r = bx * threads + tx
                if r < rows:
                    b = r // (H * n)
                    h = (r // n) % H
                    i = r % n
                    m = T.decl_buffer((1,), "float32", scope="local")
                    l = T.decl_buffer((1,), "float32", scope="local")
                    part = T.decl_buffer((lanes,), "float32", scope="local")
                    s = T.decl_buffer((1,), "float32", scope="local")
                    acc = T.decl_buffer((c,), "float32", scope="local")
                    acc_u = T.decl_buffer((c,), "float32", scope="local")  # ASC "map": the other half
                    m[0] = T.float32(NEG_INF)
                    l[0] = T.float32(0)
                    for cc in range(c):
                        acc[cc] = T.float32(0)
                        acc_u[cc] = T.float32(0)
                    for ks in range(qs + 1):
                        w = win[qs, h, ks]
                        beg = geom[ks, 0]
                        nk = geom[ks, 1]
                        # first and one-past-last kept key: lo = ceil((i·nk − w·n + 1)/n), hi = ⌊(i·nk + w·n − 1)/n⌋ + 1
                        lo = T.if_then_else(w < 0, 0, T.max(0, T.floordiv(i * nk - w * n + n, n)))
                        hi = T.if_then_else(w < 0, nk, T.min(nk, T.floordiv(i * nk + w * n - 1, n) + 1))
                        for j in range(lo, hi):
                            for u in vec(lanes):
                                part[u] = T.float32(0)
                            for ch in range(chunks):
                                for u in vec(lanes):
                                    part[u] = part[u] + q[b, h, i, ch * lanes + u] * kv[0, b, h, beg + j, ch * lanes + u]
                            s[0] = T.float32(0)
                            for u in T.unroll(lanes):
                                s[0] = s[0] + part[u]
                            m_new = T.max(m[0], s[0])
                            corr = T.exp(m[0] - m_new)
                            p = T.exp(s[0] - m_new)
                            l[0] = l[0] * corr + p
                            for cc in vec(c):
                                acc[cc] = acc[cc] * corr + p * kv[1, b, h, beg + j, cc]
                            if share == "map":
                                for cc in vec(c):
                                    acc_u[cc] = acc_u[cc] * corr + p * kv[1, b + half, h, beg + j, cc]
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
