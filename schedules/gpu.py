"""The schedule rules GPU builds apply to every kernel not scheduled by hand: DLight's.

One change to DLight's default list: its matmul rule sends int8×int8→int32 matmuls whose
sides all exceed 64 to an int8 tensor-core schedule on sm_70 and newer, and in TVM 0.27 that
schedule fails in InjectSoftwarePipeline ("GetWmmaFragmentSize"). `Int8SafeMatmul` schedules
those matmuls with the CUDA-core tiling DLight uses for every other dtype.
"""
from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl


class Int8SafeMatmul(dl.gpu.Matmul):
    def apply(self, func, target, tunable):
        if target.kind.name == "cuda":
            # an arch below sm_70 turns off the tensor-core branch and nothing else of the rule
            attrs = dict(target.export())
            attrs.pop("host", None)
            attrs["arch"] = "sm_61"
            target = tvm.target.Target(attrs)
        return super().apply(func, target, tunable)


def default_schedule():
    return dl.ApplyDefaultSchedule(Int8SafeMatmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())
