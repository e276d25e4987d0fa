"""host.deploy against TVM's own RPC server and tracker on loopback: same greedy tokens on the
'board', and bounded, one-line failures."""
import subprocess
import sys
import time

import pytest

from compiler.build import build
from conftest import ROOT, run_cli, serve, tiny_models
from host.net import free_port
from host.net import stop_group as stop


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    var, vae = tiny_models()
    return build(var, vae, None, "host", 1, tmp_path_factory.mktemp("d") / "art", log=lambda s: None)


@pytest.fixture(scope="module")
def rpc_server():
    port = free_port()
    p = serve("tvm.exec.rpc_server", port=port)
    yield port
    stop(p)


def test_deploy_over_rpc_gives_the_local_tokens(artifact, rpc_server, tmp_path):
    r = run_cli("host.deploy", "--artifact", artifact, "--rpc", f"127.0.0.1:{rpc_server}", "--class", "0", "3",
                "--out", tmp_path / "board", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "100.00 % equal" in r.stdout
    assert (tmp_path / "board" / "deploy.json").is_file() and (tmp_path / "board" / "grid.png").is_file()


def test_sampling_on_the_board_gives_the_local_tokens(artifact, rpc_server):
    """The compiled sampler runs on the board: the uniform numbers go over, the logits stay
    there, and the same seed gives the same tokens as here (the same kernel on the same CPU)."""
    import numpy as np
    from tvm import rpc

    from device.runtime import CompiledVAR
    from device.sampling import make_rng
    local = CompiledVAR(artifact)
    board = CompiledVAR(artifact, session=rpc.connect("127.0.0.1", rpc_server))
    assert local.kernel_sampler and board.kernel_sampler
    want = local.generate([2], cfg=3.0, top_k=20, top_p=0.9, rng=make_rng(4))[0]
    got = board.generate([2], cfg=3.0, top_k=20, top_p=0.9, rng=make_rng(4))[0]
    assert np.array_equal(got, want)


def test_refused_connection_is_a_quick_one_line_error(artifact):
    t0 = time.time()
    r = run_cli("host.deploy", "--artifact", artifact, "--rpc", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert r.returncode == 2 and "not reachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 60


def test_tracker_without_a_free_board_gives_up_in_bounded_time(artifact):
    port = free_port()
    tracker = serve("tvm.exec.rpc_tracker", port=port)
    try:
        t0 = time.time()
        r = run_cli("host.deploy", "--artifact", artifact, "--tracker", f"127.0.0.1:{port}", "--key", "nobody",
                    "--timeout", "3")
        assert r.returncode == 2 and "no board with key 'nobody'" in r.stderr
        assert time.time() - t0 < 90
        # an x86 artifact is refused for an ARM board's key before anything is uploaded
        r = run_cli("host.deploy", "--artifact", artifact, "--tracker", f"127.0.0.1:{port}", "--key", "rpi5")
        assert r.returncode == 2 and "not uploading" in r.stderr and "rpi5" in r.stderr
    finally:
        stop(tracker)


def test_profile_here_writes_json_markdown_and_plot(artifact, tmp_path):
    r = run_cli("host.profile", "--artifact", artifact, "-n", "2", "--out", tmp_path / "p", timeout=300)
    assert r.returncode == 0, r.stderr
    import json
    res = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert res["images"] == 2 and {"scale_0", "scale_3", "decode", "total"} <= set(res["functions_ms"])
    assert "attention" in res["kernel_families_ms"] and res["memory_mb"]["weights"] > 0
    assert (tmp_path / "p" / "profile.png").stat().st_size > 1000 and (tmp_path / "p" / "profile.md").is_file()


def test_profile_roofline_counts_each_weight_at_its_stored_bytes():
    """fp32 4 bytes, fp16 2 (4 on OpenCL, which holds it in float32), W8A8 1, int4 ½, once per scale."""
    from host.profile import transformer_work
    model = {"width": 8, "depth": 2, "vocab_size": 16, "var": {"mlp_hidden": 32}, "patch_nums": [1, 2]}
    quant = {"blocks.0.ffn.fc2": {"scheme": "fp16"}, "blocks.1.attn.mat_qkv": {"scheme": "w8a8"},
             "head": {"scheme": "w4a16", "group": 32}}
    per_block = 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8
    macs, dense = transformer_work(model, 1)
    assert dense == 2 * 4.0 * (2 * per_block + 8 * 16)
    _, planned = transformer_work(model, 1, quant)
    assert planned == dense - 2 * (2.0 * 32 * 8 + 3.0 * 8 * 24 + 3.5 * 8 * 16)
    assert transformer_work(model, 1, quant, "opencl")[1] == planned + 2 * 2.0 * 32 * 8
    assert macs == transformer_work(model, 1, quant)[0]


def test_board_killed_mid_profile_keeps_what_was_measured(artifact, tmp_path):
    port = free_port()
    board = serve("tvm.exec.rpc_server", port=port)
    p = subprocess.Popen([sys.executable, "-m", "host.profile", "--artifact", str(artifact), "--rpc",
                          f"127.0.0.1:{port}", "-n", "500", "--out", str(tmp_path / "p")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    stop(board)                       # the board goes away mid-run
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "the board failed after" in err and len(err.strip().splitlines()) >= 1
    import json
    res = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert res["error"] and res["images"] < 500
