"""--ssh for real: an OpenSSH server on loopback with throw-away keys; the board behind it is the
emulated aarch64 board (its Python runs under qemu-user)."""
import getpass
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from conftest import run_cli
from host.net import free_port, stop_group, wait_listening

SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None,
                                reason="needs openssh-server")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(port, client key, known_hosts with the server's key) of an sshd on 127.0.0.1."""
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    p = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    if not wait_listening(port, 20, p):
        stop_group(p)
        pytest.skip("sshd could not start on this machine")
    kind, key = (d / "host.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
    (d / "empty_known_hosts").write_text("")
    yield port, d / "client", d
    stop_group(p)


def test_unknown_host_key_is_refused(sshd, tiny_build):
    port, key, d = sshd
    art = tiny_build("host")
    r = run_cli("host.deploy", "--artifact", art, "--ssh", f"{getpass.getuser()}@127.0.0.1:{port}",
                "--ssh-key", key, "--known-hosts", d / "empty_known_hosts", "--timeout", "10")
    assert r.returncode == 2 and "unknown host key" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs qemu-user-static and g++-aarch64-linux-gnu")
def test_deploy_over_ssh_to_the_emulated_board(sshd, tiny_build, tmp_path):
    """Known host key and key auth; runtime files copied; TVM's rpc_server started on the board's
    loopback, reached through the tunnel, a greedy generation there equal to the host build's,
    and the server stopped afterwards."""
    from device.runtime import CompiledVAR
    from host.emulate import prepare
    port, key, d = sshd
    arm, host = tiny_build("arm64-cpu"), tiny_build("host")
    toks, _ = CompiledVAR(host).generate([4], cfg=4.0, top_k=1, top_p=0.0)
    np.savez(tmp_path / "expect.npz", tokens=toks, labels=np.array([4]))
    r = run_cli("host.deploy", "--artifact", arm, "--ssh", f"{getpass.getuser()}@127.0.0.1:{port}",
                "--ssh-key", key, "--known-hosts", d / "known_hosts", "--board-python", prepare(log=lambda s: None),
                "--class", "4", "--expect", tmp_path / "expect.npz", "--timeout", "120", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "100.00 % equal" in r.stdout
    assert os.path.isfile(os.path.expanduser("~/litevar-edge/device/runtime.py"))
    time.sleep(1)
    assert not leftovers()


def leftovers() -> list[str]:
    """The tunnel and the board's rpc_server, if either still runs. The board's server is the one
    whose working directory is the runtime folder on the board: other tests may run RPC servers
    of their own at the same time (pytest -n)."""
    board_dir = os.path.realpath(os.path.expanduser("~/litevar-edge"))
    left = []
    for pid in subprocess.run(["pgrep", "-f", "tvm.exec.rpc_server|host.ssh --tunnel"], capture_output=True,
                              text=True).stdout.split():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue   # ended meanwhile
        if "host.ssh --tunnel" in cmd or cwd == board_dir:
            left.append(f"{pid}: {cmd}")
    return left
