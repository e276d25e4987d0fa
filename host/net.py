"""Loopback and TCP helpers shared by deploy, emulate and their tests: addresses, free ports,
waiting for a server to listen, and stopping a server with the workers it started."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
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
