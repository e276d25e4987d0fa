"""Running a compiled artifact: load the library and weights (after the sha256 check), then
generate scale by scale with the static per-scale functions and a preallocated KV cache.

Only the TVM runtime, numpy and Pillow are used here: this file runs on the board.
"""
from __future__ import annotations

from pathlib import Path

import os
import platform
import time

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine  # the runtime's VM: boards may have a runtime-only TVM

from device.artifact import ArtifactError, load_manifest
from device.sampling import sample_tokens

SCHEMA, VERSION = "litevar-artifact", 3   # 2: caches as separate arguments; 3: and returned by scale_s


def cfg_weights(cfg: float, si: int, num_scales: int) -> np.ndarray:
    """(1 + t, t) of scale si; t grows linearly to `cfg` (compiler/sampler.py:cfg_weight)."""
    t = cfg * si / (num_scales - 1)
    return np.array([1 + t, t], np.float32)


def device_of(kind: str):
    """The TVM device an artifact's kernels run on (manifest "device")."""
    return {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}[kind](0)


def load_gpu_runtime(kind: str, where) -> None:
    """Make a runtime-only TVM able to load CUDA kernels: the wheel keeps CUDA support in a
    sidecar library that only the compiler side loads, and the kernels travel as CUDA source
    that tvm.support.nvcc compiles (NVRTC, or nvcc) when the library is loaded."""
    if kind != "cuda":
        return
    import ctypes
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), ctypes.RTLD_LOCAL)
        except OSError as e:
            raise ArtifactError(f"{where}: built for CUDA, but TVM's CUDA runtime does not load here ({e})") from None
    # TVM's own compile callback asks the compiler-side Target API for the arch, which a
    # runtime-only TVM lacks: compile for the GPU that is here instead.
    import tvm_ffi
    from tvm.support import nvcc
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc")

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_for_this_gpu(code, *_):
        fmt = "fatbin" if mode == "nvcc" else "cubin"
        return nvcc.compile_cuda(code, target_format=fmt, arch=arch, compiler=mode)


class CompiledVAR:
    """A loaded artifact. `generate(labels, ...)` returns (tokens B×L int64, images B×3×H×W).

    With `session` (a TVM RPC session to a board) the library is uploaded and run there; the
    loop and the sampling stay here, as in TVM's own RPC workflows."""

    def __init__(self, artifact_dir, device=None, check_arch=True, session=None):
        d = Path(artifact_dir)
        self.manifest = m = load_manifest(d)  # hashes every file first
        if m.get("schema") != SCHEMA or m.get("version") != VERSION:
            raise ArtifactError(f"{d}/manifest.json: not a {SCHEMA} v{VERSION} artifact (rebuild it)")
        kind = m.get("device", "cpu")
        self.remote = session is not None
        if self.remote:
            session.upload(str(d / m["library"]), m["library"])
            self.lib = session.load_module(m["library"])
            self.dev = {"cpu": session.cpu, "cuda": session.cuda, "opencl": session.cl}[kind](0)
        else:
            here = platform.machine()
            built_for = m.get("triple", "x86_64-linux-gnu").split("-")[0]
            if check_arch and built_for != here:
                raise ArtifactError(f"{d}: built for {built_for} ({m.get('target')}), this machine is {here}")
            self.dev = device or device_of(kind)
            load_gpu_runtime(kind, d)
            self.lib = tvm.runtime.load_module(str(d / m["library"]))
        self.vm = VirtualMachine(self.lib, self.dev)
        with np.load(d / m["params"], allow_pickle=False) as arrays:
            missing = [n for n in m["param_names"] if n not in arrays]
            if missing:
                raise ArtifactError(f"{d / m['params']}: weight '{missing[0]}' is missing")
            self.params = [tvm.runtime.tensor(arrays[n], self.dev) for n in m["param_names"]]
        model = m["model"]
        self.patch_nums = model["patch_nums"]
        self.batch = m["batch"]
        self.num_classes = model["num_classes"]
        kv_shape = (2, 2 * self.batch, model["heads"], model["seq_len"], model["width"] // model["heads"])
        self.kv = [tvm.runtime.tensor(np.zeros(kv_shape, np.float32), self.dev) for _ in range(model["depth"])]
        self.f_hat_shape = (self.batch, model["cvae"], self.patch_nums[-1], self.patch_nums[-1])

    timings: dict | None = None   # set to {} to record seconds per function call (device.bench)

    def _invoke(self, name, *args):
        if not self.remote:
            return self.vm[name](*args, *self.params)
        # over RPC a function's tuple result does not come back from a plain call
        self.vm.set_input(name, *args, *self.params)
        self.vm.invoke_stateful(name)
        return self.vm.get_outputs(name)

    def _call(self, name, *args):
        if self.timings is None:
            return self._invoke(name, *args)
        t0 = time.perf_counter()
        out = self._invoke(name, *args)
        self.dev.sync()  # GPU calls return before the kernels finish
        self.timings.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def _tensor(self, a):
        return tvm.runtime.tensor(np.ascontiguousarray(a), self.dev)

    def generate(self, labels, *, cfg=4.0, top_k=900, top_p=0.95, rng=None, on_scale=None):
        """Generate len(labels) ≤ batch images (a short batch is padded and cut)."""
        B, S = self.batch, len(self.patch_nums)
        labels = [int(c) for c in labels]
        if not 0 < len(labels) <= B:
            raise ValueError(f"this artifact generates 1..{B} images at a time, got {len(labels)}")
        padded = labels + [labels[-1]] * (B - len(labels))
        both = np.array(padded + [self.num_classes] * B, np.int32)  # [conditional; unconditional]
        cond, x = self._call("embed", self._tensor(both))
        f_hat = tvm.runtime.tensor(np.zeros(self.f_hat_shape, np.float32), self.dev)
        tokens = []
        for si in range(S):
            logits, *kv = self._call(f"scale_{si}", x, cond, self._tensor(cfg_weights(cfg, si, S)), *self.kv)
            self.kv = list(kv)   # the same buffers locally; the board VM's copies over RPC
            idx = sample_tokens(logits.numpy(), top_k, top_p, rng)
            tokens.append(idx)
            idx_t = self._tensor(idx.astype(np.int32))
            if si < S - 1:
                f_hat, x = self._call(f"next_{si}", idx_t, f_hat)
            else:
                f_hat = self._call("last", idx_t, f_hat)
            if on_scale is not None:
                on_scale(si)
        images = self._call("decode", f_hat).numpy()
        n = len(labels)
        return np.concatenate(tokens, axis=1)[:n], images[:n]
