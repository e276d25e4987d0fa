"""A board reached over SSH (paramiko): copy the runtime, start TVM's RPC server there, tunnel to
it, and stop it afterwards.

    with SSHBoard("user@board:22", board_python="python3") as board:
        session = tvm.rpc.connect("127.0.0.1", board.local_port)

The host key must already be in known_hosts (~/.ssh/known_hosts, or `known_hosts=`); an unknown
key is refused unless `accept_new_host_key` is set, and is then saved there. Authentication is by
key file or the SSH agent; no password is ever asked for or stored. The server listens on the
board's loopback only and is reached through an SSH tunnel, so nothing new is exposed on the
board's network.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from device.errors import UserError

RUNTIME_FILES = Path(__file__).resolve().parents[1] / "device"
REMOTE_DIR = "litevar-edge"


def parse_target(spec: str) -> tuple[str, str, int]:
    user, _, rest = spec.rpartition("@")
    host, _, port = rest.partition(":")
    if not user or not host or (port and not port.isdigit()):
        raise UserError(f"--ssh {spec}: expected USER@HOST[:PORT]")
    return user, host, int(port or 22)


class SSHBoard:
    def __init__(self, spec: str, *, key_file=None, known_hosts=None, accept_new_host_key=False,
                 board_python="python3", remote_port=None, timeout=30.0, log=print):
        self.user, self.host, self.port = parse_target(spec)
        self.spec, self.key_file, self.accept_new = spec, key_file, accept_new_host_key
        self.known_hosts = Path(known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
        self.board_python, self.remote_port, self.timeout, self.log = board_python, remote_port, timeout, log
        self.client = self.pgid = self.tunnel = None
        self.local_port = None

    # -- connection -------------------------------------------------------------------------
    def __enter__(self):
        import paramiko
        try:
            self._connect()
            self._copy_runtime()
            self._start_server()
            self._open_tunnel()
        except paramiko.SSHException as e:
            self.close()
            raise UserError(f"--ssh {self.spec}: {e}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _connect(self):
        import logging
        import paramiko
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # the readiness probe's refusals
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if self.accept_new else paramiko.RejectPolicy())
        try:
            client.connect(self.host, self.port, username=self.user, allow_agent=True,
                           key_filename=str(self.key_file) if self.key_file else None,
                           look_for_keys=True, timeout=self.timeout, banner_timeout=self.timeout,
                           auth_timeout=self.timeout)
        except paramiko.BadHostKeyException:
            raise UserError(f"--ssh {self.spec}: the host key does not match {self.known_hosts}; refusing") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise UserError(f"--ssh {self.spec}: unknown host key (not in {self.known_hosts}); check it and add it "
                                f"(ssh-keyscan -p {self.port} {self.host}), or pass --accept-new-host-key") from None
            raise UserError(f"--ssh {self.spec}: {e}") from None
        except OSError as e:
            raise UserError(f"--ssh {self.spec}: cannot connect ({e.strerror or e})") from None
        if self.accept_new:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            client.save_host_keys(str(self.known_hosts))
        self.client = client
        self.log(f"ssh: connected to {self.host}:{self.port} as {self.user}")

    def _run(self, command: str) -> str:
        _, out, err = self.client.exec_command(command, timeout=self.timeout)
        status = out.channel.recv_exit_status()
        text = out.read().decode()
        if status:
            raise UserError(f"--ssh {self.spec}: `{command[:60]}…` failed: {err.read().decode().strip()[-200:]}")
        return text

    def _copy_runtime(self):
        """device/ (the torch-free runtime) into ~/litevar-edge on the board."""
        sftp = self.client.open_sftp()
        try:
            for d in (REMOTE_DIR, f"{REMOTE_DIR}/device"):
                try:
                    sftp.mkdir(d)
                except OSError:
                    pass  # exists
            files = sorted(RUNTIME_FILES.glob("*.py"))
            for f in files:
                sftp.put(str(f), f"{REMOTE_DIR}/device/{f.name}")
        finally:
            sftp.close()
        self.log(f"ssh: copied {len(files)} runtime files to ~/{REMOTE_DIR}/device")

    def _free_board_port(self) -> int:
        """A port nothing listens on at the board's loopback (a fixed one may be taken)."""
        code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
        return int(self._run(f'{self.board_python} -c "{code}"').strip().splitlines()[-1])

    def _start_server(self):
        p = self.remote_port = self.remote_port or self._free_board_port()
        # `&` on the server alone, so that $! is its PID, which setsid makes its process group too
        cmd = (f"cd {REMOTE_DIR} || exit 1; setsid nohup {self.board_python} -m tvm.exec.rpc_server --host 127.0.0.1 "
               f"--port {p} --port-end {p + 1} > rpc_server.log 2>&1 < /dev/null & echo $!")
        self.pgid = int(self._run(cmd).strip())
        deadline = time.time() + self.timeout * 4   # an emulated board imports TVM slowly
        while time.time() < deadline:
            try:
                self.client.get_transport().open_channel("direct-tcpip", ("127.0.0.1", p), ("127.0.0.1", 0)).close()
                self.log(f"ssh: rpc_server running on the board (process group {self.pgid})")
                return
            except Exception:  # noqa: BLE001  (not listening yet)
                time.sleep(1)
        log_tail = self._run(f"tail -n 3 {REMOTE_DIR}/rpc_server.log || true").strip()
        raise UserError(f"--ssh {self.spec}: the board's rpc_server did not start: {log_tail[-300:]}")

    # -- tunnel -----------------------------------------------------------------------------
    def _open_tunnel(self):
        """Start the tunnel in a child process (`python -m host.ssh --tunnel …`). It cannot be a
        thread of this process: TVM's RPC client waits for the board's reply inside C++ holding
        the GIL, so a forwarding thread here would never get to forward the request."""
        cmd = [sys.executable, "-m", "host.ssh", "--tunnel", self.spec, "--remote-port", str(self.remote_port),
               "--known-hosts", str(self.known_hosts), "--timeout", str(self.timeout)]
        if self.key_file:
            cmd += ["--key-file", str(self.key_file)]
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.tunnel = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env)
        ready, _, _ = select.select([self.tunnel.stdout], [], [], self.timeout)
        line = self.tunnel.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            self.tunnel.kill()
            err = self.tunnel.stderr.read().strip().splitlines()
            raise UserError(f"--ssh {self.spec}: the tunnel did not open: {(err or ['no answer'])[-1][:200]}")
        self.local_port = int(line.split()[-1])
        self.log(f"ssh: tunnel 127.0.0.1:{self.local_port} -> board 127.0.0.1:{self.remote_port}")

    def close(self):
        if self.tunnel is not None:
            self.tunnel.stdin.close()   # the tunnel exits when its stdin closes
            try:
                self.tunnel.wait(5)
            except subprocess.TimeoutExpired:
                self.tunnel.kill()
            self.tunnel = None
        if self.client is not None:
            if self.pgid:
                try:
                    self._run(f"kill -9 -- -{self.pgid} 2>/dev/null || kill -9 {self.pgid} 2>/dev/null || true")
                    self.log("ssh: stopped the board's rpc_server")
                except Exception:  # noqa: BLE001  (the board may be gone)
                    pass
            self.client.close()
            self.client = None


def serve_tunnel(board: SSHBoard):
    """Forward 127.0.0.1:<free port> here to the board's 127.0.0.1:<remote port> until stdin closes."""
    board._connect()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(f"listening on {listener.getsockname()[1]}", flush=True)

    def accept():
        while True:
            conn, peer = listener.accept()
            try:
                chan = board.client.get_transport().open_channel("direct-tcpip", ("127.0.0.1", board.remote_port), peer)
            except Exception:  # noqa: BLE001  (the server went away: refuse this connection)
                conn.close()
                continue
            threading.Thread(target=_pump, args=(conn, chan), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()   # until the parent closes it (or dies)
    board.client.close()


def _pump(sock, chan):
    """Copy bytes both ways between a local socket and an SSH channel until one side closes."""
    try:
        while True:
            ready, _, _ = select.select([sock, chan], [], [], 1.0)
            if sock in ready:
                data = sock.recv(1 << 16)
                if not data:
                    break
                chan.sendall(data)
            if chan in ready:
                data = chan.recv(1 << 16)
                if not data:
                    break
                sock.sendall(data)
    except OSError:
        pass
    finally:
        chan.close()
        sock.close()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m host.ssh", description="the SSH tunnel of host/ssh.py (internal)")
    ap.add_argument("--tunnel", required=True, metavar="USER@HOST[:PORT]")
    ap.add_argument("--remote-port", type=int, required=True)
    ap.add_argument("--known-hosts", required=True)
    ap.add_argument("--key-file")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    try:
        serve_tunnel(SSHBoard(a.tunnel, key_file=a.key_file, known_hosts=a.known_hosts, remote_port=a.remote_port,
                              timeout=a.timeout, log=lambda s: None))
    except UserError as e:
        sys.exit(f"error: {e}")
