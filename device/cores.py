"""How many threads TVM's CPU kernels get.

TVM sizes its thread pool, when first used, from TVM_NUM_THREADS, else on x86 from half the
logical CPUs (it assumes two hyper-threads per core). On x86 machines without SMT — this
2-vCPU build machine, many cloud VMs — that leaves half the cores idle: every parallel kernel
ran on one of two cores here. Unless the user set TVM_NUM_THREADS, we set it to the physical
cores this process may run on, before TVM starts its pool.
"""
from __future__ import annotations

import os
from pathlib import Path


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
