"""ONNX export of the per-scale graphs: ONNX Runtime gives the reference's greedy tokens."""
import json
import shutil

import numpy as np
import pytest

from compiler.export_onnx import export
from compiler.sampler import generate
from conftest import run_cli, tiny_models
from device.artifact import ArtifactError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    var, vae = tiny_models()
    return export(var, vae, 2, tmp_path_factory.mktemp("o") / "onnx", log=lambda s: None)


def test_onnx_runtime_gives_the_reference_tokens_and_images(exported):
    from host.onnx_engine import OnnxVAR
    var, vae = tiny_models()
    want_t, want_i = generate(var, vae, [0, 3], cfg=4.0, top_k=1, top_p=0.0)
    got_t, got_i = OnnxVAR(exported).generate([0, 3], cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(got_t, want_t.numpy())
    np.testing.assert_allclose(got_i, want_i.numpy(), atol=1e-4)
    assert {p.name for p in exported.iterdir()} >= {"embed.onnx", "scale_0.onnx", "scale_3.onnx", "next_2.onnx",
                                                   "last.onnx", "decode.onnx", "manifest.json", "weights.bin"}


def test_onnx_runtime_without_prepacking_gives_the_reference_tokens(exported):
    from host.onnx_engine import OnnxVAR
    var, vae = tiny_models()
    want_t, _ = generate(var, vae, [1, 2], cfg=4.0, top_k=1, top_p=0.0)
    got_t, _ = OnnxVAR(exported, prepacking=False).generate([1, 2], cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(got_t, want_t.numpy())


def test_the_weights_are_stored_once_in_weights_bin(exported):
    from compiler.export_onnx import ALIGN, SHARE_MIN_BYTES, VERSION
    from host.onnx_engine import VERSION as ENGINE_VERSION
    m = json.loads((exported / "manifest.json").read_text())
    assert m["version"] == VERSION == ENGINE_VERSION == 3 and "weights.bin" in m["files"]
    tables = m["initializers"]
    assert set(tables) == set(m["graphs"])
    # every scale graph uses all transformer weights: 4 copies of them if each graph held its own
    per_graph = sum(length for t in tables.values() for _, length, _, _ in t.values())
    one_scale = sum(length for _, length, _, _ in tables["scale_1"].values())
    entries = {(off, dt, tuple(shape)): length for t in tables.values() for off, length, dt, shape in t.values()}
    size = (exported / "weights.bin").stat().st_size
    assert size < per_graph - 3 * one_scale + ALIGN * len(entries)   # at most alignment padding over one copy
    assert len({off for off, _, _ in entries}) == len(entries)   # one offset, one tensor
    assert all(off % ALIGN == 0 and length >= SHARE_MIN_BYTES for (off, _, _), length in entries.items())
    stored = {g: {(off, length) for off, length, _, _ in t.values()} for g, t in tables.items()}
    assert stored["scale_1"] and stored["scale_1"] == stored["scale_2"]   # two graphs, the same stored tensors
    buf = np.fromfile(exported / "weights.bin", np.uint8)
    blobs = [buf[off:off + length].tobytes() for (off, _, _), length in entries.items()]
    assert len(set(blobs)) == len(blobs)   # no tensor stored twice


def test_a_plain_inference_session_runs_one_scale_graph(exported):
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(exported / "scale_1.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    s = ort.InferenceSession(str(exported / "scale_1.onnx"))   # resolves weights.bin next to the file
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in s.get_inputs()}
    logits, k, v = s.run(None, feeds)
    assert np.isfinite(logits).all() and k.shape[3] == v.shape[3] == feeds["k_cache"].shape[3] + 4


def test_a_changed_onnx_file_is_refused(exported, tmp_path):
    from host.onnx_engine import OnnxVAR
    d = tmp_path / "o"
    shutil.copytree(exported, d)
    with open(d / "scale_1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="scale_1.onnx: sha256 does not match"):
        OnnxVAR(d)


def test_a_changed_weights_bin_is_refused(exported, tmp_path):
    from host.onnx_engine import OnnxVAR
    d = tmp_path / "o"
    shutil.copytree(exported, d)
    with open(d / "weights.bin", "r+b") as f:
        f.seek(8)
        b = f.read(1)
        f.seek(8)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ArtifactError, match="weights.bin: sha256 does not match"):
        OnnxVAR(d)


def test_a_version_1_export_is_refused_with_a_re_export_hint(exported, tmp_path):
    from host.onnx_engine import OnnxVAR
    d = tmp_path / "o"
    shutil.copytree(exported, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    with pytest.raises(ArtifactError, match="version 1.*re-export it: python -m compiler.export_onnx") as e:
        OnnxVAR(d)
    assert "\n" not in str(e.value)


def test_export_cli_refuses_a_bad_batch(tmp_path):
    r = run_cli("compiler.export_onnx", "--batch", "0", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--batch must be at least 1" in r.stderr
    assert not (tmp_path / "x").exists()
