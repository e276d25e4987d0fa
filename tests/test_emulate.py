"""The emulated aarch64 board (host.emulate): an arm64-cpu build, cross-linked here, deployed
over RPC to TVM's runtime under qemu-user, gives the host build's greedy tokens."""
import shutil
import sys

import numpy as np
import pytest

from compiler.build import build
from conftest import run_cli, tiny_models
from device.runtime import CompiledVAR
from host.net import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs qemu-user-static and g++-aarch64-linux-gnu")


def test_arm64_build_runs_on_the_emulated_board(tmp_path):
    from host.emulate import serve, stop
    var, vae = tiny_models()
    arm = build(var, vae, None, "arm64-cpu", 1, tmp_path / "arm", log=lambda s: None)
    host = build(var, vae, None, "host", 1, tmp_path / "host", log=lambda s: None)
    labels = [0, 1, 2, 3, 4]   # every class of the tiny model
    toks = np.concatenate([CompiledVAR(host).generate([c], cfg=4.0, top_k=1, top_p=0.0)[0] for c in labels])
    np.savez(tmp_path / "expect.npz", tokens=toks, labels=np.array(labels))
    port = free_port()
    board = serve(port, log=lambda s: print(s, file=sys.stderr))
    try:
        r = run_cli("host.deploy", "--artifact", arm, "--rpc", f"127.0.0.1:{port}", "--class", *map(str, labels),
                    "--expect", tmp_path / "expect.npz", "--timeout", "300", timeout=900)
        assert r.returncode == 0, r.stderr
        assert "100.00 % equal" in r.stdout
    finally:
        stop(board)
