"""Deploy an artifact to a board over TVM RPC, run one greedy generation there, check its tokens.

    python -m host.deploy --artifact DIR (--rpc HOST:PORT | --tracker HOST:PORT [--key KEY] |
                          --ssh USER@HOST[:PORT] [--ssh-key FILE] [--board-python python3] | --emulate)
                          [--class 3 7] [--cfg 4] [--expect samples.npz] [--timeout 60] [--out DIR]

The board runs TVM's own server (`python -m tvm.exec.rpc_server`, optionally registered with a
tracker under a key); the library is uploaded and loaded there, the weights are sent once, and
this machine drives the per-scale loop. The board's greedy tokens are compared with --expect
(a samples.npz of `device.generate --top-k 1` or `compiler.sample --top-k 1` on this machine),
or, when the artifact runs here too, with a local run. Through a tracker, the key names the
board (targets/*.toml `rpc_key`; default: the artifact's target), and an artifact built for
another architecture than that board's is refused before anything is uploaded. Every wait is
bounded by --timeout. With --ssh, the runtime files are copied to the board, TVM's rpc_server
is started there on its loopback, reached through an SSH tunnel and stopped afterwards
(host/ssh.py: known_hosts is checked; --accept-new-host-key to trust a new board once).
With --emulate, an emulated aarch64 board (host/emulate.py) is started here for the run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import targets
from device.artifact import load_manifest
from device.cliargs import labels_from_args
from device.errors import UserError, cli
from device.fileio import atomic_path
from host.net import rpc_session


def board_for_key(key: str):
    for name in targets.known():
        b = targets.load(name)
        if b.rpc_key == key:
            return b
    return None


def connect(args, manifest):
    """An RPC session to the board, directly or through a tracker (bounded waits)."""
    if args.rpc:
        return rpc_session(rpc=args.rpc, timeout=args.timeout, session_timeout=args.timeout * 10)
    key = args.key or targets.load(manifest["target"]).rpc_key
    board = board_for_key(key)
    if board is not None and board.triple.split("-")[0] != manifest.get("triple", "x86_64").split("-")[0]:
        raise UserError(f"{args.artifact}: built for {manifest.get('triple')}, but key '{key}' is a "
                        f"{board.name} ({board.triple}); not uploading")
    return rpc_session(tracker=args.tracker, key=key, timeout=args.timeout, session_timeout=args.timeout * 10)


def expected_tokens(args, manifest, labels, cfg):
    if args.expect:
        with np.load(args.expect, allow_pickle=False) as f:
            if list(f["labels"]) != labels:
                raise UserError(f"--expect {args.expect}: made for classes {list(f['labels'])}, not {labels}")
            return f["tokens"], str(args.expect)
    if manifest.get("triple", "x86_64").split("-")[0] == platform.machine() and manifest.get("device", "cpu") == "cpu":
        from device.runtime import CompiledVAR
        toks = [CompiledVAR(args.artifact).generate([c], cfg=cfg, top_k=1, top_p=0.0)[0] for c in labels]
        return np.concatenate(toks), "the same artifact run on this machine"
    return None, None


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m host.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, type=Path, help="directory written by compiler.build")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--rpc", help="HOST:PORT of the board's rpc_server")
    where.add_argument("--tracker", help="HOST:PORT of an RPC tracker")
    where.add_argument("--ssh", help="USER@HOST[:PORT]: start the board's rpc_server over SSH")
    where.add_argument("--emulate", action="store_true",
                       help="start an emulated aarch64 board here for this run (host.emulate; qemu-user)")
    ap.add_argument("--key", help="tracker key of the board (default: the artifact target's rpc_key)")
    ap.add_argument("--class", dest="classes", type=int, nargs="+", default=[3], metavar="C")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--expect", type=Path, help="samples.npz with the host's greedy tokens for these classes")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds any wait may take (default 60)")
    ap.add_argument("--out", type=Path, help="write the board's samples and deploy.json here")
    add_ssh_args(ap)
    args = ap.parse_args(argv)
    args.per_class, args.top_k, args.top_p = 1, 1, 0.0   # one greedy image per class
    manifest = load_manifest(args.artifact)   # a tampered artifact is refused before connecting
    labels = labels_from_args(args, manifest["model"]["num_classes"])
    want, source = expected_tokens(args, manifest, labels, args.cfg)

    with ssh_board(args), emulated_board(args):
        run(args, manifest, labels, want, source)


def add_ssh_args(ap):
    ap.add_argument("--ssh-key", help="private key file for --ssh (default: the SSH agent and ~/.ssh keys)")
    ap.add_argument("--known-hosts", help="known_hosts file for --ssh (default ~/.ssh/known_hosts)")
    ap.add_argument("--accept-new-host-key", action="store_true",
                    help="trust and save the board's host key if it is not known yet")
    ap.add_argument("--board-python", default="python3", help="the board's Python with TVM (default python3)")


@contextlib.contextmanager
def ssh_board(args):
    """With --ssh: a board started over SSH, reached as --rpc through the tunnel."""
    if not getattr(args, "ssh", None):
        yield
        return
    from host.ssh import SSHBoard
    with SSHBoard(args.ssh, key_file=args.ssh_key, known_hosts=args.known_hosts,
                  accept_new_host_key=args.accept_new_host_key, board_python=args.board_python,
                  timeout=args.timeout, log=lambda s: print(s, file=sys.stderr, flush=True)) as board:
        args.rpc = f"127.0.0.1:{board.local_port}"
        yield


@contextlib.contextmanager
def emulated_board(args):
    """With --emulate: an emulated aarch64 board on a free loopback port, reached as --rpc."""
    if not getattr(args, "emulate", False):
        yield
        return
    from host.emulate import serve, stop
    from host.net import free_port
    port = free_port()
    board = serve(port, log=lambda s: print(s, file=sys.stderr, flush=True), timeout=args.timeout * 3)
    args.rpc = f"127.0.0.1:{port}"
    try:
        yield
    finally:
        stop(board)


def run(args, manifest, labels, want, source):
    from device.runtime import CompiledVAR
    t0 = time.perf_counter()
    session = connect(args, manifest)
    print(f"connected in {time.perf_counter() - t0:.1f} s; uploading {args.artifact}", file=sys.stderr, flush=True)
    try:
        model = CompiledVAR(args.artifact, session=session)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{args.artifact}: the board could not load it: {str(e).strip().splitlines()[-1]}") from None
    toks, imgs, secs = [], [], []
    for c in labels:
        t1 = time.perf_counter()
        t, im = model.generate([c], cfg=args.cfg, top_k=1, top_p=0.0)
        secs.append(time.perf_counter() - t1)
        toks.append(t)
        imgs.append(im)
    toks, imgs = np.concatenate(toks), np.concatenate(imgs)
    result = {"artifact": str(args.artifact), "target": manifest["target"], "labels": labels,
              "seconds_per_image": float(np.median(secs)), "compared_with": source,
              "token_agreement": None if want is None else float((toks == want).mean())}
    if args.out:
        from device.output import save_samples
        save_samples(args.out, labels, toks, imgs, {"deployed": result}, cols=len(labels))
        with atomic_path(args.out / "deploy.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    print(f"board: {len(labels)} greedy images, {result['seconds_per_image']:.2f} s/image")
    if want is None:
        print("no reference tokens (give --expect to compare)")
        return
    print(f"tokens vs {source}: {result['token_agreement'] * 100:.2f} % equal")
    if result["token_agreement"] != 1.0:
        raise UserError(f"the board's greedy tokens differ from {source}")


if __name__ == "__main__":
    main()
