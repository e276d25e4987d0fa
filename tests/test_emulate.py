"""The emulated aarch64 board (host.emulate): an arm64-cpu build, cross-linked here, deployed
over RPC to TVM's runtime under qemu-user, gives the host build's greedy tokens."""
import shutil
import sys

import numpy as np
import pytest

from conftest import run_cli
from device.runtime import CompiledVAR
from host.net import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs qemu-user-static and g++-aarch64-linux-gnu")


def test_arm64_build_runs_on_the_emulated_board(tiny_build, tmp_path):
    from host.emulate import serve, stop
    arm, host = tiny_build("arm64-cpu"), tiny_build("host")
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


def test_sdot_kernels_on_the_emulated_board(tmp_path):
    """The AArch64 W8A8 and W4A8 kernels (sdot), cross-compiled here and run under qemu, equal
    the PyTorch simulation bit for bit (x86 cannot run them; arm builds use them for every W8A8
    and W4A8 layer)."""
    import torch
    import tvm
    from tvm import rpc
    from tvm.support import cc

    import targets
    from compiler.compress.quant import W4A8, W8A8, quantize_per_token_int8
    from host.emulate import serve, stop
    from schedules import qmatmul
    M, K, O = 6, 72, 32          # 2 row tiles of 3, K = 18 runs of 4 (W4A8: 9 groups of 8)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((M, K)) * 3).astype(np.float32)
    x[-1] = 1.0                  # a row of 127s
    w = rng.standard_normal((O, K)).astype(np.float32)
    xq, sx = quantize_per_token_int8(torch.from_numpy(x))
    cases = {}
    for name, scheme in (("w8a8", W8A8()), ("w4a8", W4A8(8))):
        packed = scheme.pack(torch.from_numpy(w))
        if scheme.group:
            wp, ws = qmatmul.pack_int4(packed["qweight"].numpy(), packed["scales"].numpy())
        else:
            wp, ws = qmatmul.pack_int8_dot(packed["qweight"].numpy(), "sdot"), packed["scales"].numpy()
        func = qmatmul.dense_dot(M, K, O, "sdot", scheme.group).with_attr("global_symbol", name)
        cases[name] = (func, (xq.numpy(), sx.numpy(), wp, ws, np.zeros(O, np.float32)),
                       scheme.matmul(torch.from_numpy(x), packed).numpy())
    board = targets.load("arm64-cpu")
    lib = tvm.compile(tvm.IRModule({name: c[0] for name, c in cases.items()}), target=board.tvm_target())
    path = tmp_path / "sdot.so"
    lib.export_library(str(path), fcompile=cc.cross_compiler(board.cross["compiler"]))
    port = free_port()
    proc = serve(port, log=lambda s: print(s, file=sys.stderr))
    try:
        remote = rpc.connect("127.0.0.1", port, session_timeout=300)
        remote.upload(str(path))
        mod = remote.load_module("sdot.so")
        dev = remote.cpu()
        for name, (_, arrays, want) in cases.items():
            y = tvm.runtime.empty((M, O), "float32", dev)
            mod[name](*[tvm.runtime.tensor(a, dev) for a in arrays], y)
            np.testing.assert_array_equal(y.numpy(), want, err_msg=name)
    finally:
        stop(proc)
