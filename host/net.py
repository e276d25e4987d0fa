"""Loopback and TCP helpers shared by deploy, emulate, compiler.tune and their tests: addresses,
free ports, waiting for a server to listen, stopping a server with the workers it started, and
a TVM RPC session with a board whose every wait is bounded."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

from device.errors import UserError


def parse_addr(text: str, option: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{option} {text}: expected HOST:PORT")
    return host, int(port)


def reachable(host: str, port: int, timeout: float, what: str) -> None:
    """Fail fast, with a clear message, when nothing listens (RPC's own connect can hang)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"{what} {host}:{port} is not reachable ({e.strerror or e})") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """True once 127.0.0.1:port accepts connections; False at the timeout or when `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def stop_group(proc: subprocess.Popen) -> None:
    """Kill a server started with start_new_session=True, and every worker it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def rpc_session(*, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                timeout: float = 60.0, session_timeout: float = 600.0):
    """A TVM RPC session with a board: its rpc_server directly (`rpc`, HOST:PORT) or one
    registered under `key` with a tracker (`tracker`, HOST:PORT). Connecting and waiting for a
    free board take at most `timeout` seconds; the board ends the session after
    `session_timeout`. Failures are one-line UserErrors naming --rpc or --tracker."""
    from tvm import rpc as tvm_rpc
    if rpc:
        host, port = parse_addr(rpc, "--rpc")
        reachable(host, port, timeout, "--rpc")
        try:
            return tvm_rpc.connect(host, port, session_timeout=session_timeout)
        except Exception as e:  # noqa: BLE001  (TVM raises plain errors with long traces)
            raise UserError(f"--rpc {rpc}: {str(e).strip().splitlines()[-1]}") from None
    host, port = parse_addr(tracker, "--tracker")
    reachable(host, port, timeout, "--tracker")
    # request() waits for a free board without limit: wait in a thread, give up at `timeout`
    box = {}

    def request():
        try:
            box["session"] = tvm_rpc.connect_tracker(host, port).request(key, priority=1,
                                                                         session_timeout=session_timeout)
        except Exception as e:  # noqa: BLE001
            box["error"] = e
    waiter = threading.Thread(target=request, daemon=True)
    waiter.start()
    waiter.join(timeout)
    if "session" in box:
        return box["session"]
    why = str(box["error"]).strip().splitlines()[-1][:120] if "error" in box else "all busy or none registered"
    raise UserError(f"--tracker {tracker}: no board with key '{key}' became free within {timeout:.0f} s ({why})")
