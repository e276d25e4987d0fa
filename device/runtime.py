"""Running a compiled artifact: load the library and weights (after the sha256 check), then
generate scale by scale with the static per-scale functions and a preallocated KV cache.

Only the TVM runtime, numpy and Pillow are used here: this file runs on the board.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from device.artifact import ArtifactError, load_manifest
from device.sampling import sample_tokens

SCHEMA, VERSION = "litevar-artifact", 1


def cfg_weights(cfg: float, si: int, num_scales: int) -> np.ndarray:
    """(1 + t, t) of scale si; t grows linearly to `cfg` (compiler/sampler.py:cfg_weight)."""
    t = cfg * si / (num_scales - 1)
    return np.array([1 + t, t], np.float32)


class CompiledVAR:
    """A loaded artifact. `generate(labels, ...)` returns (tokens B×L int64, images B×3×H×W)."""

    def __init__(self, artifact_dir, device=None):
        d = Path(artifact_dir)
        self.manifest = m = load_manifest(d)  # hashes every file first
        if m.get("schema") != SCHEMA or m.get("version") != VERSION:
            raise ArtifactError(f"{d}/manifest.json: not a {SCHEMA} v{VERSION} artifact")
        self.dev = device or tvm.cpu()
        self.lib = tvm.runtime.load_module(str(d / m["library"]))
        self.vm = relax.VirtualMachine(self.lib, self.dev)
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
        self.kv = [tvm.runtime.empty(kv_shape, "float32", self.dev) for _ in range(model["depth"])]
        self.f_hat_shape = (self.batch, model["cvae"], self.patch_nums[-1], self.patch_nums[-1])

    def _call(self, name, *args):
        return self.vm[name](*args, *self.params)

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
            logits, _ = self._call(f"scale_{si}", x, cond, self._tensor(cfg_weights(cfg, si, S)), self.kv)
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
