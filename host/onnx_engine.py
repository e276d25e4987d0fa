"""ONNX Runtime on the exported per-scale graphs (python -m compiler.export_onnx), as a
comparison engine: the same generation loop and numpy sampling as the compiled runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from device.artifact import ArtifactError, load_manifest
from device.runtime import cfg_weights
from device.sampling import sample_tokens


class OnnxVAR:
    def __init__(self, export_dir, threads: int | None = None):
        import onnxruntime as ort
        d = Path(export_dir)
        self.manifest = m = load_manifest(d)   # hashes every file first
        if m.get("schema") != "litevar-onnx":
            raise ArtifactError(f"{d}/manifest.json: not an ONNX export of compiler.export_onnx")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's idle workers spin by default: in a benchmark process they starve the engine
        # timed next (the compiled build ran 6× slower right after ORT). Sleep when idle.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {g: ort.InferenceSession(str(d / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
                         for g in m["graphs"]}
        model = m["model"]
        self.batch, self.patch_nums, self.num_classes = m["batch"], model["patch_nums"], model["num_classes"]
        P = self.patch_nums[-1]
        self.f_hat_shape = (self.batch, model["cvae"], P, P)

    def _run(self, name, **inputs):
        return self.sessions[name].run(None, inputs)

    def generate(self, labels, *, cfg=4.0, top_k=900, top_p=0.95, rng=None):
        B, S = self.batch, len(self.patch_nums)
        labels = [int(c) for c in labels]
        padded = labels + [labels[-1]] * (B - len(labels))
        both = np.array(padded + [self.num_classes] * B, np.int64)
        cond, x = self._run("embed", labels=both)
        f_hat = np.zeros(self.f_hat_shape, np.float32)
        k = v = None
        tokens = []
        for si in range(S):
            feeds = {"x": x, "cond": cond, "tw": cfg_weights(cfg, si, S)}
            if si > 0:
                feeds.update(k_cache=k, v_cache=v)
            logits, k, v = self._run(f"scale_{si}", **feeds)
            idx = sample_tokens(logits, top_k, top_p, rng)
            tokens.append(idx)
            if si < S - 1:
                f_hat, x = self._run(f"next_{si}", idx=idx.astype(np.int64), f_hat=f_hat)
            else:
                (f_hat,) = self._run("last", idx=idx.astype(np.int64), f_hat=f_hat)
        (images,) = self._run("decode", f_hat=f_hat)
        n = len(labels)
        return np.concatenate(tokens, axis=1)[:n], images[:n]
