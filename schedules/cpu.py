"""The schedule rules CPU builds apply to every kernel not scheduled by hand.

TVM's default CPU pipeline leaves legalized operators (LayerNorm, GELU, softmax, GroupNorm,
the small matmuls of the f̂ resize and the decoder's attention, copies) as serial loops on one
core. DLight's CPU `Reduction` rule parallelises and vectorises the norm/softmax family; the
`ParallelLoops` rule below takes what is left: chains of elementwise blocks are inlined into
one, then per block the outer spatial loops run in parallel and an injective block's innermost
loop is vectorised.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

VECTOR = 8          # fp32 lanes of an AVX2 / two NEON registers
MIN_PARALLEL = 64   # below this many outer iterations a thread launch costs more than it saves


class ParallelLoops(CPUScheduleRule):
    def apply(self, func, target, _):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        # a fused elementwise chain (GELU: 12 blocks) as one loop nest, not one pass per block
        infos = try_inline_contiguous_spatial(sch, infos)
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))       # leading spatial loops
            if not loops or lead == 0:
                continue
            if info.is_injective() and lead > 1:
                inner = loops[-1]
                extent = get_extent(sch, inner)
                if isinstance(extent, int) and extent % VECTOR == 0:
                    _, vec = sch.split(inner, [None, VECTOR])
                    sch.vectorize(vec)
                lead -= 1
            outer = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
            extent = get_extent(sch, outer)
            if not isinstance(extent, int) or extent >= MIN_PARALLEL:
                sch.parallel(outer)
        return sch


def default_schedule():
    return dl.ApplyDefaultSchedule(dl.cpu.Reduction(), ParallelLoops())
