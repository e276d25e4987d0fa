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

from device.artifact import ArtifactError, load_manifest, missing_cpu_flags
from device.sampling import sample_tokens

# 2: caches as separate arguments; 3: and returned by scale_s; 4: cache shape in the manifest
SCHEMA, VERSION = "litevar-artifact", 4


def cfg_weights(cfg: float, si: int, num_scales: int) -> np.ndarray:
    """(1 + t, t) of scale si; t grows linearly to `cfg` (compiler/sampler.py:cfg_weight)."""
    t = cfg * si / (num_scales - 1)
    return np.array([1 + t, t], np.float32)


def device_of(kind: str):
    """The TVM device an artifact's kernels run on (manifest "device")."""
    return {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}[kind](0)


def load_gpu_runtime(kind: str, where, code: dict | None = None) -> str | None:
    """Make a runtime-only TVM able to load CUDA kernels, and say how they were loaded.

    The wheel keeps CUDA support in a sidecar library that only the compiler side loads. The
    library holds the kernels as CUDA source; TVM asks `tvm_callback_cuda_compile` for a binary
    when it loads them. With an ahead-of-time kernels.fatbin in the artifact (manifest
    device_code, made by compiler/build.py) that callback returns the fatbin; without one, or
    when this driver is older than the CUDA that built it, it compiles the source for the GPU
    that is here (NVRTC, or nvcc with TVM_CUDA_COMPILE_MODE=nvcc)."""
    if kind != "cuda":
        return None
    import ctypes
    import hashlib
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), ctypes.RTLD_LOCAL)
        except OSError as e:
            raise ArtifactError(f"{where}: built for CUDA, but TVM's CUDA runtime does not load here ({e})") from None
    import tvm_ffi
    from tvm.support import nvcc
    gpu = tvm.cuda(0)
    arch = "sm_" + gpu.compute_version.replace(".", "")
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc")
    fatbin, how = None, f"compiled from source on load ({mode}, {arch})"
    if code and code.get("format") == "fatbin":
        driver = cuda_driver_major()
        built = int(code["cuda_version"].split(".")[0])
        if driver is not None and driver < built:
            how += f": the fatbin needs a CUDA {built} driver, this one is CUDA {driver}"
        else:
            fatbin = (Path(where) / code["file"]).read_bytes()   # its sha256 was checked with the manifest
            how = f"ahead-of-time {code['file']} ({code['arch']}, CUDA {code['cuda_version']})"
    known = set(code.get("source_sha256", [])) if code else set()

    # TVM's own callback asks the compiler-side Target API for the arch, which a runtime-only
    # TVM lacks, so it is replaced.
    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def kernels_for_this_gpu(source, *_):
        if fatbin is not None and hashlib.sha256(source.encode()).hexdigest() in known:
            return fatbin
        fmt = "fatbin" if mode == "nvcc" else "cubin"
        return nvcc.compile_cuda(source, target_format=fmt, arch=arch, compiler=mode)
    return how


def cuda_driver_major() -> int | None:
    """The CUDA version the installed driver supports (12 for JetPack 6), from libcuda itself
    (TVM's Device.driver_version is None for CUDA)."""
    import ctypes
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value // 1000
    except OSError:
        pass
    return None


class CompiledVAR:
    """A loaded artifact. `generate(labels, ...)` returns (tokens B×L int64, images B×3×H×W).

    With `session` (a TVM RPC session to a board) the library is uploaded and run there; the
    loop stays here, as in TVM's own RPC workflows, and so does the sampling of artifacts
    without a compiled sampler (their logits come over the network)."""

    def __init__(self, artifact_dir, device=None, check_arch=True, session=None):
        d = Path(artifact_dir)
        self.manifest = m = load_manifest(d)  # hashes every file first
        if m.get("schema") != SCHEMA or m.get("version") != VERSION:
            raise ArtifactError(f"{d}/manifest.json: not a {SCHEMA} v{VERSION} artifact (rebuild it)")
        kind = m.get("device", "cpu")
        self.remote = session is not None
        self.kernels = None   # how CUDA kernels were loaded (load_gpu_runtime), when there are any
        if self.remote:
            session.upload(str(d / m["library"]), m["library"])
            self.lib = session.load_module(m["library"])
            self.dev = {"cpu": session.cpu, "cuda": session.cuda, "opencl": session.cl}[kind](0)
        else:
            here = platform.machine()
            built_for = m.get("triple", "x86_64-linux-gnu").split("-")[0]
            if check_arch and built_for != here:
                raise ArtifactError(f"{d}: built for {built_for} ({m.get('target')}), this machine is {here}")
            missing = missing_cpu_flags(m.get("cpu_flags", [])) if check_arch else []
            if missing:
                cpu = (m.get("tvm_host") or m.get("tvm_target") or {}).get("mcpu", m.get("target"))
                raise ArtifactError(f"{d}: built for a CPU with {', '.join(missing)} ({cpu}), which this machine's "
                                    f"CPU lacks; rebuild it for this machine (compiler.build --target host)")
            self.dev = device or device_of(kind)
            self.kernels = load_gpu_runtime(kind, d, m.get("device_code"))
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
        # the layout is the kernels' business (schedules/kv_layout.py); zeros: the padding is read, never used
        self.kv = [tvm.runtime.tensor(np.zeros(m["kv_shape"], np.float32), self.dev) for _ in range(model["depth"])]
        self.f_hat_shape = (self.batch, model["cvae"], self.patch_nums[-1], self.patch_nums[-1])
        # sample_<s> in the module (CPU builds): the draws run in the kernels' thread pool, and over
        # RPC the logits stay on the board; older artifacts and GPU builds: device/sampling.py
        self.kernel_sampler = m.get("sampler") == "kernel"
        # inputs made once: tvm.runtime.tensor() costs ~0.1 ms a call, 3 % of a demo image at 3 a scale
        self._u = [tvm.runtime.empty((self.batch, p * p), "float32", self.dev)
                   for p in self.patch_nums] if self.kernel_sampler else None
        # each scale's CFG weights and the sampler's [top_k, top_p]: one set, new settings copied in
        self._settings = [tvm.runtime.empty((2,), "float32", self.dev) for _ in range(len(self.patch_nums) + 1)]
        self._setting = self._mods = None   # the setting they hold; _static_mods

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

    def _setting_tensors(self, cfg, top_k, top_p):
        """Every scale's CFG weights and the sampler's [top_k, top_p] on the device, in tensors
        made once: a new setting is copied into them, because a CUDA-graph build's scale
        functions replay with the addresses they were captured with (compiler/build.py:
        static_scale_inputs), as for the KV caches and mods."""
        key = (float(cfg), int(top_k), float(top_p))
        if key != self._setting:
            S = len(self.patch_nums)
            for t, v in zip(self._settings, [cfg_weights(cfg, si, S) for si in range(S)]
                            + [np.array([top_k, top_p], np.float32)]):
                t.copyfrom(v)
            self._setting = key
        return self._settings[:-1], self._settings[-1]

    def _static_mods(self, mods):
        """embed's modulation vectors, copied into the one tensor every scale call receives."""
        if self._mods is None:
            self._mods = tvm.runtime.empty(mods.shape, mods.dtype, self.dev)
        self._mods.copyfrom(mods)
        return self._mods

    def generate(self, labels, *, cfg=4.0, top_k=900, top_p=0.95, rng=None, on_scale=None):
        """Generate len(labels) ≤ batch images (a short batch is padded and cut)."""
        B, S = self.batch, len(self.patch_nums)
        labels = [int(c) for c in labels]
        if not 0 < len(labels) <= B:
            raise ValueError(f"this artifact generates 1..{B} images at a time, got {len(labels)}")
        padded = labels + [labels[-1]] * (B - len(labels))
        both = np.array(padded + [self.num_classes] * B, np.int32)  # [conditional; unconditional]
        mods, x = self._call("embed", self._tensor(both))
        mods = self._static_mods(mods)
        f_hat = tvm.runtime.tensor(np.zeros(self.f_hat_shape, np.float32), self.dev)
        weights, opts = self._setting_tensors(cfg, top_k, top_p)
        tokens = []
        for si in range(S):
            logits, *kv = self._call(f"scale_{si}", x, mods, weights[si], *self.kv)
            self.kv = list(kv)   # the same buffers locally; the board VM's copies over RPC
            if self.kernel_sampler:
                u = self._u[si]
                if top_k != 1:   # greedy draws no random number (and the kernel reads none)
                    u.copyfrom(rng.random(u.shape).astype(np.float32))
                idx_t = self._call(f"sample_{si}", logits, u, opts)
                idx = idx_t.numpy().astype(np.int64)
            else:
                idx = sample_tokens(logits.numpy(), top_k, top_p, rng)
                idx_t = self._tensor(idx.astype(np.int32))
            tokens.append(idx)
            if si < S - 1:
                f_hat, x = self._call(f"next_{si}", idx_t, f_hat)
            else:
                f_hat = self._call("last", idx_t, f_hat)
            if on_scale is not None:
                on_scale(si)
        images = self._call("decode", f_hat).numpy()
        n = len(labels)
        return np.concatenate(tokens, axis=1)[:n], images[:n]
