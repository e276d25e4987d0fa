"""ONNX export of the per-scale graphs: ONNX Runtime gives the reference's greedy tokens."""
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
                                                   "last.onnx", "decode.onnx", "manifest.json"}


def test_a_changed_onnx_file_is_refused(exported, tmp_path):
    import shutil
    from host.onnx_engine import OnnxVAR
    d = tmp_path / "o"
    shutil.copytree(exported, d)
    with open(d / "scale_1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="scale_1.onnx: sha256 does not match"):
        OnnxVAR(d)


def test_export_cli_refuses_a_bad_batch(tmp_path):
    r = run_cli("compiler.export_onnx", "--batch", "0", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--batch must be at least 1" in r.stderr
    assert not (tmp_path / "x").exists()
