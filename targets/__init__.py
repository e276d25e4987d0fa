"""Board descriptions (TVM targets, cross compilers, roofline figures), one entry per board.

`resolve(name)` gives the TVM target to compile for; an unknown name lists the known ones.
"""
from __future__ import annotations

import os

from device.errors import UserError


def _host():
    import tvm  # noqa: PLC0415  (only the build machine needs the compiler)
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    # Without an explicit CPU, LLVM targets generic x86-64 (SSE only): name this machine's.
    return {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}


KNOWN = {"host": _host}


def resolve(name: str) -> dict:
    """Target name → TVM target dict."""
    if name not in KNOWN:
        raise UserError(f"--target {name}: unknown target; known targets: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]()
