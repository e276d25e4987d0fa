"""2-D convolution (NCHW, stride 1, 'same' padding) as a scheduled TIR kernel for CPUs.

Same register tiling as the dense kernel (schedules/matmul.py), with output channels in the
role of rows (weights broadcast) and 16 contiguous output pixels of a row in the vector lanes,
so every input load is a contiguous vector. The VQVAE decoder is made of these convolutions.
"""
from __future__ import annotations

from functools import lru_cache

from tvm import s_tir
from tvm.script import tirx as T

from schedules.matmul import row_tile


@lru_cache(maxsize=None)  # one parse and schedule per shape
def conv2d(B: int, Ci: int, H: int, W: int, Co: int, k: int):
    """x B×Ci×H×W, w Co×Ci×k×k, b Co → y B×Co×H×W (zero padding k//2, stride 1)."""
    p = k // 2
    Hp, Wp = H + 2 * p, W + 2 * p
    lanes = next((v for v in (16, 8) if W % v == 0), 1)

    @T.prim_func(private=True, s_tir=True)
    def conv(x: T.Buffer((T.int64(B), T.int64(Ci), T.int64(H), T.int64(W)), "float32"),
             w: T.Buffer((T.int64(Co), T.int64(Ci), T.int64(k), T.int64(k)), "float32"),
             b: T.Buffer((T.int64(Co),), "float32"),
             y: T.Buffer((T.int64(B), T.int64(Co), T.int64(H), T.int64(W)), "float32")):
        T.func_attr({"tirx.noalias": True})
        xp = T.alloc_buffer((T.int64(B), T.int64(Ci), T.int64(Hp), T.int64(Wp)), "float32")
        acc = T.alloc_buffer((T.int64(B), T.int64(Co), T.int64(H), T.int64(W)), "float32")
        for n, c, i, j in T.grid(T.int64(B), T.int64(Ci), T.int64(Hp), T.int64(Wp)):
            with T.sblock("pad"):
                vn, vc, vi, vj = T.axis.remap("SSSS", [n, c, i, j])
                xp[vn, vc, vi, vj] = T.if_then_else(
                    vi >= T.int64(p) and vi < T.int64(H + p) and vj >= T.int64(p) and vj < T.int64(W + p),
                    x[vn, vc, vi - T.int64(p), vj - T.int64(p)], T.float32(0))
        for n, o, i, j, c, r, s in T.grid(T.int64(B), T.int64(Co), T.int64(H), T.int64(W), T.int64(Ci),
                                          T.int64(k), T.int64(k)):
            with T.sblock("conv"):
                vn, vo, vi, vj, vc, vr, vs = T.axis.remap("SSSSRRR", [n, o, i, j, c, r, s])
                with T.init():
                    acc[vn, vo, vi, vj] = T.float32(0)
                acc[vn, vo, vi, vj] = acc[vn, vo, vi, vj] + xp[vn, vc, vi + vr, vj + vs] * w[vo, vc, vr, vs]
        for n, o, i, j in T.grid(T.int64(B), T.int64(Co), T.int64(H), T.int64(W)):
            with T.sblock("bias"):
                vn, vo, vi, vj = T.axis.remap("SSSS", [n, o, i, j])
                y[vn, vo, vi, vj] = acc[vn, vo, vi, vj] + b[vo]

    sch = s_tir.Schedule(conv)
    blk = sch.get_sblock("conv")
    n, o, i, j, c, r, s = sch.get_loops(blk)
    oo, oi = sch.split(o, [None, row_tile(Co)])
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(n, oo, i, jo, c, r, s, oi, ji)
    out = sch.get_sblock("bias")
    sch.reverse_compute_at(out, jo)
    sch.vectorize(ji)
    sch.unroll(oi)
    sch.unroll(s)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.parallel(sch.fuse(n, oo, i))
    sch.decompose_reduction(blk, c)
    pad = sch.get_sblock("pad")
    sch.parallel(sch.fuse(*sch.get_loops(pad)[:2]))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
