"""Token sampling (top-k, top-p, one multinomial draw per token) as a TIR kernel for CPUs.

The rule of device/sampling.py and of the reference sampler, without a sort: the k-th largest
logit and the smallest logit of the top-p nucleus are found by bisection on the logits' bits,
each step one vectorised pass over the row, and the draw walks the nucleus in a fixed order of
its own (any fixed order gives the same distribution). One parallel task per token, in the
kernels' thread pool; the uniform numbers come from the caller's seeded generator. top-k 1 is
greedy: the first token holding the largest logit, as numpy's argmax.

Per row, with key(x) the float's bits as an int32 in the floats' order:
    keys, max              key of every logit; the largest
    top-k bisection        tk = the largest key that at least k keys reach (the k-th largest)
    weights                w = exp(x − max) where key ≥ tk, else 0; total = Σ w
    top-p bisection        c = the smallest key whose weight at or below it exceeds
                           (1 − top_p)·total: the nucleus is key ≥ c
    draw                   the nucleus's weight per vector lane; the lane, then the token, where
                           the running weight passes u·(nucleus weight)
Sums run per lane, not in sorted order as in the reference, so a logit sitting exactly on the
nucleus boundary may fall the other way after rounding; logits tied at a boundary are all kept.
"""
from __future__ import annotations

from functools import lru_cache

from tvm.script import tirx as T

from schedules.attention import fast_exp

LANES = 8       # keys and weights per vector: one AVX2 register
ROUNDS = 32     # bisection steps: enough to pin any int32 key
CHAINS = 4      # independent vector sums in lane_sums (float adds have 3-4 cycles latency)
LOWEST = -(2 ** 31)   # the padding's key, below every float's


def sort_key(x):
    """float32 → int32 in the same order (negative floats: the magnitude bits flipped)."""
    bits = T.reinterpret("int32", x)
    return T.Select(bits < 0, bits ^ T.int32(0x7FFFFFFF), bits)


def key_value(k):
    """The float32 whose sort_key is k."""
    return T.reinterpret("float32", T.Select(k < 0, k ^ T.int32(0x7FFFFFFF), k))


def midpoint(lo, hi, up: int):
    """⌊(lo + hi + up)/2⌋ without int32 overflow."""
    return T.Cast("int32", T.floordiv(T.Cast("int64", lo) + T.Cast("int64", hi) + up, 2))


@lru_cache(maxsize=None)  # one parse per shape
def sample_rows(N: int, V: int):
    """logits N×V float32, u N float32 in [0, 1), opts [top_k, top_p] float32 → tokens N int32.
    top_k ≤ 0 or ≥ V keeps every token; top_p 0 turns the nucleus off."""
    i64 = T.int64
    NV = (V + LANES - 1) // LANES   # vectors per row

    @T.macro
    def lane_sums(part, sums, key, w, lo, hi):
        """part[j] = Σ w over the tokens ≡ j (mod LANES) whose key is in [lo, hi], summed in CHAINS
        independent chains (float adds have 3-4 cycles latency)."""
        for t in T.unroll(CHAINS):
            for j in T.vectorized(LANES):
                sums[t, j] = T.float32(0)
        for i0 in range(NV // CHAINS):
            for t in T.unroll(CHAINS):
                for j in T.vectorized(LANES):
                    sums[t, j] = sums[t, j] + T.Select((key[(i0 * CHAINS + t) * LANES + j] >= lo) & (key[(i0 * CHAINS + t) * LANES + j] <= hi),
                                                       w[(i0 * CHAINS + t) * LANES + j], T.float32(0))
        for i0 in range(NV // CHAINS * CHAINS, NV):
            for j in T.vectorized(LANES):
                sums[0, j] = sums[0, j] + T.Select((key[i0 * LANES + j] >= lo) & (key[i0 * LANES + j] <= hi),
                                                   w[i0 * LANES + j], T.float32(0))
        for j in T.vectorized(LANES):
            part[j] = sums[0, j]
        for t in T.unroll(CHAINS - 1):
            for j in T.vectorized(LANES):
                part[j] = part[j] + sums[t + 1, j]

    @T.prim_func(private=True)
    def sample(logits: T.Buffer((i64(N), i64(V)), "float32"), u: T.Buffer((i64(N),), "float32"),
               opts: T.Buffer((i64(2),), "float32"), tokens: T.Buffer((i64(N),), "int32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for r in T.parallel(N):
            key = T.decl_buffer((NV * LANES,), "int32", scope="local")
            w = T.decl_buffer((NV * LANES,), "float32", scope="local")
            hits = T.decl_buffer((LANES,), "int32", scope="local")
            part = T.decl_buffer((LANES,), "float32", scope="local")
            sums = T.decl_buffer((CHAINS, LANES), "float32", scope="local")
            cut = T.decl_buffer((5,), "int32", scope="local")       # bisection lo, hi, mid; largest key; tk
            acc = T.decl_buffer((4,), "float32", scope="local")     # total, sum, cut-off weight, target
            pick = T.decl_buffer((3,), "int32", scope="local")      # found, lane, token
            for i0 in range(NV):
                # loaded clamped in a statement of its own: under the Select's condition TVM drops
                # the clamp, and the vector load reads past the row (docs/tvm-0.27-findings.md)
                for j in T.vectorized(LANES):
                    key[i0 * LANES + j] = sort_key(logits[r, T.min(i0 * LANES + j, V - 1)])
                for j in T.vectorized(LANES):
                    key[i0 * LANES + j] = T.Select(i0 * LANES + j < V, key[i0 * LANES + j], LOWEST)
            for j in T.vectorized(LANES):
                hits[j] = key[j]
            for i0 in range(1, NV):
                for j in T.vectorized(LANES):
                    hits[j] = T.max(hits[j], key[i0 * LANES + j])
            cut[3] = hits[0]
            for j in range(1, LANES):
                cut[3] = T.max(cut[3], hits[j])
            if T.Cast("int32", opts[0]) == 1:   # greedy: the first token holding the largest key
                pick[2] = 0
                for i in range(V):
                    if key[V - 1 - i] == cut[3]:
                        pick[2] = V - 1 - i
                tokens[r] = pick[2]
            else:
                # tk: the largest key that at least k keys reach; every real key when k keeps all
                cut[0] = LOWEST + 1
                if (T.Cast("int32", opts[0]) > 0) & (T.Cast("int32", opts[0]) < V):
                    cut[0] = LOWEST
                    cut[1] = cut[3]
                    for _ in range(ROUNDS):
                        if cut[0] < cut[1]:
                            cut[2] = midpoint(cut[0], cut[1], 1)
                            for j in T.vectorized(LANES):
                                hits[j] = 0
                            for i0 in range(NV):
                                for j in T.vectorized(LANES):
                                    hits[j] = hits[j] + T.Select(key[i0 * LANES + j] >= cut[2], 1, 0)
                            for j in range(1, LANES):
                                hits[0] = hits[0] + hits[j]
                            if hits[0] >= T.Cast("int32", opts[0]):
                                cut[0] = cut[2]
                            else:
                                cut[1] = cut[2] - 1
                cut[4] = cut[0]
                for i0 in range(NV):
                    for j in T.vectorized(LANES):
                        w[i0 * LANES + j] = T.Select(key[i0 * LANES + j] >= cut[4], fast_exp(
                            logits[r, T.min(i0 * LANES + j, V - 1)] - key_value(cut[3])), T.float32(0))
                lane_sums(part, sums, key, w, cut[4], cut[3])
                acc[0] = T.float32(0)
                for j in range(LANES):
                    acc[0] = acc[0] + part[j]
                # c: the smallest key whose weight at or below it exceeds (1 − top_p)·total
                cut[0] = cut[4]
                if opts[1] > T.float32(0):
                    cut[1] = cut[3]
                    acc[2] = (T.float32(1) - opts[1]) * acc[0]
                    for _ in range(ROUNDS):
                        if cut[0] < cut[1]:
                            cut[2] = midpoint(cut[0], cut[1], 0)
                            lane_sums(part, sums, key, w, cut[4], cut[2])
                            acc[1] = T.float32(0)
                            for j in range(LANES):
                                acc[1] = acc[1] + part[j]
                            if acc[1] > acc[2]:
                                cut[1] = cut[2]
                            else:
                                cut[0] = cut[2] + 1
                # the draw: the nucleus's weight per lane, then the lane and the token where the
                # running weight passes u·(nucleus weight); the last occupied lane if rounding misses
                lane_sums(part, sums, key, w, cut[0], cut[3])
                acc[3] = T.float32(0)
                for j in range(LANES):
                    acc[3] = acc[3] + part[j]
                    if part[j] > T.float32(0):
                        pick[1] = j
                acc[3] = acc[3] * u[r]
                acc[1] = T.float32(0)
                pick[0] = 0
                for j in range(LANES):
                    if pick[0] == 0:
                        if (acc[1] + part[j] > acc[3]) | (j == pick[1]):
                            pick[1] = j
                            pick[0] = 1
                        else:
                            acc[1] = acc[1] + part[j]
                pick[0] = 0
                for i0 in range(NV):
                    if key[i0 * LANES + pick[1]] >= cut[0]:
                        if pick[0] == 0:
                            pick[2] = i0 * LANES + pick[1]
                            acc[1] = acc[1] + w[i0 * LANES + pick[1]]
                            if acc[1] > acc[3]:
                                pick[0] = 1
                tokens[r] = pick[2]

    return sample.with_attr("tirx.is_scheduled", True)
