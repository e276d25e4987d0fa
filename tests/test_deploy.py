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
def artifact(tiny_build):
    return tiny_build("host")


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


def test_profile_roofline_reads_the_dense_layers_arrays_once_per_scale(tmp_path):
    """The roofline's weight reads are the bytes of the artifact's qkv, proj, fc1, fc2 and head
    arrays as stored (a plan's W8A8 and fp16 layers smaller than fp32), once per scale; the
    embeddings, AdaLN and the decoder are not read per scale."""
    import json

    import numpy as np

    from compiler.compress.plan import Plan
    from host.profile import transformer_work
    var, vae = tiny_models()
    plan = Plan.empty(var.cfg)
    plan.quant_layers.update({"blocks.0.ffn.fc2": {"scheme": "fp16", "group": None},
                              "blocks.1.attn.mat_qkv": {"scheme": "w8a8", "group": None}})
    reads = {}
    for name, p in (("dense", None), ("plan", plan)):
        art = build(var, vae, p, "host", 1, tmp_path / name, log=lambda s: None)
        man = json.loads((art / "manifest.json").read_text())
        with np.load(art / "params.npz") as arrays:
            sizes = {n: arrays[n].nbytes for n in man["param_names"]}
        macs, reads[name] = transformer_work(man["model"], 1, sizes)
        S = len(man["model"]["patch_nums"])
        assert reads[name] < S * sum(sizes.values())
        assert reads[name] % S == 0 and macs > 0
    C, hidden = man["model"]["width"], man["model"]["var"].get("mlp_hidden") or 4 * man["model"]["width"]
    fc2, qkv = hidden * C, C * 3 * C            # fp16 saves 2 bytes a weight, W8A8 3 (plus its scales)
    assert reads["dense"] - reads["plan"] == S * (2 * fc2 + 3 * qkv - 4 * 3 * C)


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
