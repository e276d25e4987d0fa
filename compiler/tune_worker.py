"""What MetaSchedule's builder and runner worker processes call for compiler.tune.

The workers unpickle these functions by module and name, so this module imports neither torch
nor the compiler (a builder worker is started afresh for every round).
"""
from __future__ import annotations


def build(mod, target, _params):
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin`: the candidate
    arrives scheduled (and tensorized, where a rule did), so the build needs no intrinsic
    table, and parsing TVM's CUDA and ROCm intrinsics takes a fresh worker about a minute of CPU."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
