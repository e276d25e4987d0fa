"""What MetaSchedule's builder and runner worker processes call for compiler.tune.

The workers unpickle these functions by module and name, so this module imports neither torch
nor the compiler (a builder worker is started afresh for every round).
"""
from __future__ import annotations

import os
import tempfile


def build(mod, target, _params):
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin`: the candidate
    arrives scheduled (and tensorized, where a rule did), so the build needs no intrinsic
    table, and parsing TVM's CUDA and ROCm intrinsics takes a fresh worker about a minute of CPU."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def export_shared(mod, compiler: str | None = None) -> str:
    """A candidate as a shared library linked here, with the board's cross compiler when it has
    one: the board only loads it (the default export is a tar the board would have to link)."""
    from tvm.support import cc
    path = os.path.join(tempfile.mkdtemp(prefix="tune-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(compiler) if compiler else cc.create_shared)
    return path


def session(config, *, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
            timeout: float = 60.0):
    """RPCRunner's session for one candidate: to the board's server (rpc) or through a tracker,
    every wait bounded by `timeout` (TVM's own tracker request waits for a free board forever);
    the session itself ends after `config.session_timeout_sec`."""
    from host.net import rpc_session
    return rpc_session(rpc=rpc, tracker=tracker, key=key, timeout=timeout,
                       session_timeout=config.session_timeout_sec)


def alloc_arguments(session, device, args_info, alloc_repeat: int) -> list:
    """RPCRunner's argument allocation: random inputs made by the board's
    tvm.contrib.random.random_fill_for_measure where it has one, else made here and copied
    over (a runtime-only TVM, as on a board, does not have it). Integer tensors are zeros
    there: they may be indices, and a random index can fault."""
    import numpy as np
    import tvm
    try:
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    except (AttributeError, RuntimeError):
        fill = None
    rng = np.random.default_rng(0)

    def alloc(kind, dtype, shape):
        if kind != "TENSOR":
            raise NotImplementedError(kind)
        arg = tvm.runtime.empty(shape=shape, dtype=dtype, device=device)
        if fill is not None:
            fill(arg)
        elif dtype in ("float16", "float32", "float64"):
            arg.copyfrom(rng.uniform(-1.0, 1.0, size=shape).astype(dtype))
        elif dtype.startswith(("int", "uint", "bool")):
            arg.copyfrom(np.zeros(shape, dtype=dtype))
        return arg   # other types (bfloat16, float8) keep what the board's memory held
    return [[alloc(*info) for info in args_info] for _ in range(alloc_repeat)]
