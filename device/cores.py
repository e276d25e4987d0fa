"""How many threads TVM's CPU kernels get.

TVM sizes its thread pool, when first used, from TVM_NUM_THREADS, else on x86 from half the
logical CPUs (it assumes two hyper-threads per core). On x86 machines without SMT — this
2-vCPU build machine, many cloud VMs — that leaves half the cores idle: every parallel kernel
ran on one of two cores here. Unless the user set TVM_NUM_THREADS, we set it to the physical
cores this process may run on, before TVM starts its pool.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

SETTLE_S = 0.5   # see settle()


def physical_cores() -> int:
    """Distinct cores (sets of SMT siblings) among the CPUs this process may run on."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))      # no topology (containers, other OSes): count the CPU itself
    return max(1, len(cores))


def claim_cores():
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))


def settle():
    """Wait until the worker threads of the engine that just ran have stopped spinning. TVM's
    pool, PyTorch's OpenMP and ONNX Runtime's pool each keep their threads spinning for a while
    after a parallel call, and on a machine with few cores they compete with the next engine's
    threads: in schedules.bench our fp32 layer timed right after PyTorch's took 1.15–1.4× its
    time without PyTorch in the rounds, which flattered W8A8's ratio over it. TVM's pool spins
    longest (it yields, TVM_THREAD_POOL_SPIN_COUNT times): PyTorch's GroupNorm 0.1 s after a
    burst of TVM calls took 4–5 ms a call, 0.3 s after 0.3 ms, 0.5 s after 0.17 ms. Benchmarks
    that interleave engines call this before timing each one."""
    time.sleep(SETTLE_S)
