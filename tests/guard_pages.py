"""Run one kernel with an input placed against an unreadable page, so that a read past its end
(or before its start) faults instead of passing unseen: `python tests/guard_pages.py CASE`.
tests/test_kernels.py runs each case in a process of its own and expects it to exit cleanly.

Kernels pad or clamp at their edges; a vector load whose lanes are discarded afterwards still
reads memory, and only a guard page shows it (docs/tvm-0.27-findings.md)."""
import ctypes
import mmap
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tvm  # noqa: E402

from schedules import conv, sampling, winograd  # noqa: E402
from schedules.bench import compile_kernel  # noqa: E402

_keep = {}   # id of each guarded array → its mapping, alive while the array is in use


def guarded(a: np.ndarray, at: str) -> np.ndarray:
    """A copy of `a` whose last byte (at="end") or first byte (at="start") touches a page that
    cannot be read. TVM takes arrays aligned to 64 bytes: at="end" needs a.nbytes % 64 == 0."""
    assert at == "start" or a.nbytes % 64 == 0, a.nbytes
    page = mmap.PAGESIZE
    body = (a.nbytes + page - 1) // page * page
    m = mmap.mmap(-1, body + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    guard, offset = (body, body - a.nbytes) if at == "end" else (0, page)
    out = np.frombuffer(m, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
    out[...] = a
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(ctypes.c_void_p(base + guard), page, 0) != 0:
        raise OSError("mprotect failed")
    _keep[id(out)] = m
    return out


def tensor(a):
    """Guarded arrays are handed over in place (a copy would leave the guard behind)."""
    return tvm.runtime.from_dlpack(a) if id(a) in _keep else tvm.runtime.tensor(a)


def run(func, args, outs):
    f = compile_kernel(func)
    f(*[tensor(a) for a in args], *[tvm.runtime.empty(s, d) for s, d in outs])


def conv_case(kernel, B, Ci, H, W, Co, which, at):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, Ci, H, W)).astype(np.float32)
    w = conv.pack_weight(rng.standard_normal((Co, Ci, 3, 3)).astype(np.float32))
    b = np.zeros(Co, np.float32)
    x, w = (guarded(x, at) if which == "x" else x), (guarded(w, at) if which == "w" else w)
    run(kernel, [x, w, b], [((B, Co, H, W), "float32")])


CASES = {
    # Co = 16: the last product tile of 6 output channels holds 4 (its taps past Co are 0)
    "winograd_w_end": lambda: conv_case(winograd.conv2d(1, 3, 16, 16, 16), 1, 3, 16, 16, 16, "w", "end"),
    "winograd_x_start": lambda: conv_case(winograd.conv2d(1, 3, 16, 16, 16), 1, 3, 16, 16, 16, "x", "start"),
    "winograd_x_end": lambda: conv_case(winograd.conv2d(1, 3, 16, 16, 16), 1, 3, 16, 16, 16, "x", "end"),
    "conv_x_start": lambda: conv_case(conv.conv2d(1, 3, 8, 8, 4, 3), 1, 3, 8, 8, 4, "x", "start"),
    "conv_x_end": lambda: conv_case(conv.conv2d(1, 3, 8, 8, 4, 3), 1, 3, 8, 8, 4, "x", "end"),
    # 1001 codes: each row ends in part of a vector (16 rows: the array ends on a 64-byte line)
    "sampling_logits_end": lambda: run(sampling.sample_rows(16, 1001),
                                       [guarded(np.zeros((16, 1001), np.float32), "end"), np.zeros(16, np.float32),
                                        np.array([0, 0.0], np.float32)], [((16,), "int32")]),
}

if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print("ok")
