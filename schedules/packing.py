"""Numpy-only weight layouts, importable where only the TVM runtime is installed.

A kernel's weight layout is needed on both sides: at build time (compiler/lower/layers.py
packs the parameters) and at run time on a GPU machine that has the TVM runtime but not its
compiler (schedules/gpu_bench.py `run` packs the inputs it feeds the built kernels). The
kernel modules (schedules/qmatmul.py) import tvm.script and the TIR compiler, so the layouts
the runtime side needs live here, with no TVM import; qmatmul re-exports them.
"""
from __future__ import annotations

import numpy as np


def pack_dp4a(qweight: np.ndarray) -> np.ndarray:
    """int8 O×K → K/4 × O × 4: each int32 word holds one channel's weights for 4 consecutive inputs."""
    O, K = qweight.shape
    if K % 4:
        raise ValueError(f"dp4a packing needs K % 4 == 0, got {K}")
    return np.ascontiguousarray(qweight.reshape(O, K // 4, 4).transpose(1, 0, 2))
