"""ONNX Runtime on the exported per-scale graphs (python -m compiler.export_onnx), as a
comparison engine: the same generation loop and numpy sampling as the compiled runtime.

The export keeps the weights once, in weights.bin. Opening each .onnx file by path would have
ONNX Runtime load the weights of every graph separately (each scale graph uses all of them); so
weights.bin is read once into one buffer, every distinct tensor becomes an OrtValue viewing it,
and each session gets those through SessionOptions.add_initializer: all sessions share the copy.
That holds only without ONNX Runtime's weight prepacking (`prepacking=False`): with it, its
usual setting and the default here, each session keeps a packed copy of its weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from device.artifact import ArtifactError, load_manifest
from device.runtime import cfg_weights
from device.sampling import sample_tokens


# The export format, written by compiler.export_onnx (which imports these: this module needs no torch).
SCHEMA = "litevar-onnx"
VERSION = 3    # 3: embed gives the AdaLN vectors (mods), not the class embedding; 2: weights once in
               # a shared weights.bin (external data); 1 had them in every graph
ALIGN = 4096   # weights.bin offsets, and the buffer it is read into


def check_version(d: Path):
    """Refuse an export of another version before hashing its (possibly 12 GB of) files."""
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return   # load_manifest says what is wrong
    if isinstance(m, dict) and m.get("schema") == SCHEMA and m.get("version") != VERSION:
        raise ArtifactError(f"{d}: ONNX export version {m.get('version')}, this engine reads version {VERSION} "
                            f"; re-export it: python -m compiler.export_onnx --out {d}")


def read_weights(path: Path) -> np.ndarray:
    """weights.bin as one page-aligned uint8 buffer (its offsets are ALIGN-aligned too)."""
    size = path.stat().st_size
    raw = np.empty(size + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    buf = raw[start:start + size]
    with open(path, "rb") as f:
        if f.readinto(memoryview(buf)) != size:
            raise ArtifactError(f"{path}: shorter than its {size} bytes while reading")
    return buf


class OnnxVAR:
    def __init__(self, export_dir, threads: int | None = None, prepacking: bool = True):
        """`prepacking`: let ONNX Runtime repack the MatMul/Gemm/Conv weights in each session.
        The Python API has no shared prepacked-weights container, so every session then keeps
        its own packed copy of the weights it multiplies by (ten scale sessions, ten copies:
        the sharing saves next to nothing; demo: 588 MB peak vs 536 MB without). On by
        default, ONNX Runtime's usual setting: without it, it ran ~10% slower on the demo."""
        import onnxruntime as ort
        d = Path(export_dir)
        check_version(d)
        self.manifest = m = load_manifest(d)   # hashes every file first
        if m.get("schema") != SCHEMA:
            raise ArtifactError(f"{d}/manifest.json: not an ONNX export of compiler.export_onnx")
        try:
            tables = {g: m["initializers"][g] for g in m["graphs"]}
            weights = d / m["weights"]
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{d}/manifest.json: no shared-weights table ({e}); re-export it") from None
        self._weights = buf = read_weights(weights)
        self._values = {}   # (offset, dtype, shape) → OrtValue viewing buf; alive as long as the sessions
        self.sessions = {}
        for g, table in tables.items():
            opts = ort.SessionOptions()   # add_initializer is per options object: one per session
            if threads:
                opts.intra_op_num_threads = threads
            # ORT's idle workers spin by default: in a benchmark process they starve the engine
            # timed next (the compiled build ran 6× slower right after ORT). Sleep when idle.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if not prepacking:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            for name, (offset, length, dtype, shape) in table.items():
                key = (offset, dtype, tuple(shape))
                if key not in self._values:
                    dt = np.dtype(dtype)
                    if offset % dt.itemsize or offset + length > buf.size or length != dt.itemsize * int(np.prod(shape)):
                        raise ArtifactError(f"{weights}: {g}/{name} at {offset}+{length} does not fit {dtype} {shape}")
                    view = buf[offset:offset + length].view(dt).reshape(shape)
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(view)
                opts.add_initializer(name, self._values[key])
            self.sessions[g] = ort.InferenceSession(str(d / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
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
        mods, x = self._run("embed", labels=both)
        f_hat = np.zeros(self.f_hat_shape, np.float32)
        k = v = None
        tokens = []
        for si in range(S):
            feeds = {"x": x, "mods": mods, "tw": cfg_weights(cfg, si, S)}
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
