"""An emulated aarch64 board on this x86 machine: TVM's RPC server under qemu-user, on loopback.

    python -m host.emulate [--port 9190] [--tracker HOST:PORT --key arm64-cpu] [--prepare-only]

The first run prepares an aarch64 root under the user's cache directory
(~/.cache/litevar-edge/arm64): Debian's arm64 Python 3.11 and the C libraries it needs
(`apt-get download` with arm64 as the only architecture and a private package list, so the
system's apt configuration is not touched), unpacked with `dpkg -x`, and the aarch64 wheels of
TVM, tvm-ffi, numpy, cloudpickle and psutil. Later runs reuse it. The server runs the TVM
runtime only (TVM_USE_RUNTIME_LIB=1), as a board would; `python -m host.deploy --rpc
127.0.0.1:9190 --artifact DIR` then uploads and runs an `arm64-cpu` (or `rpi5`) build there.
Timings under emulation say nothing about a real board.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from device.errors import UserError, cli
from host.net import stop_group, wait_listening

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "litevar-edge" / "arm64"
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11", "libc6",
        "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libgcc-s1",
        "libstdc++6", "libuuid1", "libncursesw6", "libtinfo6", "libcrypt1"]
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes",
          "typing_extensions", "cloudpickle", "psutil"]
QEMU = "qemu-aarch64-static"


def _run(cmd, what, log):
    log(f"  {what}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        raise UserError(f"{what} failed: {tail[0]}")


def prepare(cache: Path = CACHE, log=print) -> Path:
    """Make (or reuse) the aarch64 root; returns the path of a `python3` that runs under qemu."""
    if shutil.which(QEMU) is None:
        raise UserError(f"{QEMU} not found; install it with: apt-get install qemu-user-static")
    python = cache / "python3"
    if python.exists():
        return python
    cache.parent.mkdir(parents=True, exist_ok=True)
    # two emulators started at once (two test workers, two shells) prepare it one after the other
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not python.exists():
            _prepare(cache, python, log)
    return python


def _prepare(cache: Path, python: Path, log) -> None:
    log(f"preparing an aarch64 root in {cache} (once)")
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    lists, debs, wheels, root, site = (tmp / n for n in ("apt/lists", "debs", "wheels", "root", "site"))
    for d in (lists / "partial", tmp / "apt/cache/archives/partial", debs, wheels, root, site):
        d.mkdir(parents=True, exist_ok=True)
    apt = ["apt-get", "-q", "-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64", f"-oDir::State::Lists={lists}",
           f"-oDir::Cache={tmp / 'apt/cache'}", "-oDebug::NoLocking=1"]
    _run(apt + ["update"], "apt-get update (arm64 package lists)", log)
    _run(["sh", "-c", f"cd {debs} && " + " ".join(apt + ["download"] + DEBS)], "apt-get download (arm64 Python)", log)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}", lambda s: None)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
          "--implementation", "cp", *[f"--platform=manylinux_2_{n}_aarch64" for n in (17, 24, 26, 27, 28)],
          "--platform=manylinux2014_aarch64", "-d", str(wheels), *WHEELS], "pip download (aarch64 wheels)", log)
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    (site / "tvm" / "lib" / "libtvm_compiler.so").unlink(missing_ok=True)  # a board needs the runtime only
    final_root, final_site = cache / "root", cache / "site"
    wrapper = (f"#!/bin/sh\nexec {shutil.which(QEMU)} -L {final_root} -E PYTHONPATH={final_site} "
               f"-E TVM_USE_RUNTIME_LIB=1 {final_root}/usr/bin/python3.11 \"$@\"\n")
    # TVM's RPC server starts its workers with sys.executable, the arm64 binary, which this
    # kernel cannot exec without binfmt_misc: point it at the wrapper instead.
    (site / "sitecustomize.py").write_text(f"import sys\nsys.executable = {str(python)!r}\n")
    (tmp / "python3").write_text(wrapper)
    (tmp / "python3").chmod(0o755)
    shutil.rmtree(tmp / "apt")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


def serve(port: int, tracker: str | None = None, key: str = "arm64-cpu", cache: Path = CACHE, log=print,
          timeout: float = 180.0) -> subprocess.Popen:
    """Start the emulated board's rpc_server on 127.0.0.1:port; returns once it accepts connections."""
    python = prepare(cache, log)
    cmd = [str(python), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
           "--port-end", str(port + 1)]
    if tracker:
        cmd += ["--tracker", tracker, "--key", key]
    log_path = cache / f"rpc_server.{port}.log"
    with open(log_path, "w") as f:
        # its own process group: stop() ends the server and the workers it started
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    if wait_listening(port, timeout, proc):
        return proc
    if proc.poll() is not None:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"the emulated board's rpc_server exited: {tail[0]} (log: {log_path})")
    stop(proc)
    raise UserError(f"the emulated board did not start within {timeout:.0f} s")


stop = stop_group   # ends the emulated board: the server and its worker processes


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m host.emulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=9190)
    ap.add_argument("--tracker", help="register with this RPC tracker (HOST:PORT)")
    ap.add_argument("--key", default="arm64-cpu", help="tracker key (default arm64-cpu)")
    ap.add_argument("--prepare-only", action="store_true", help="prepare the aarch64 root and exit")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.prepare_only:
        print(prepare(log=log))
        return
    proc = serve(args.port, args.tracker, args.key, log=log)
    print(f"emulated aarch64 board serving TVM RPC on 127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
