"""compiler.tune: MetaSchedule (XGBoost cost model) over the kernels no hand-written schedule
covers, measured here or on a board over TVM RPC (directly or through a tracker); the database
is applied by compiler.build and does not change the tokens."""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from compiler.build import build
from compiler.sampler import generate
from compiler.tune import RECORDS, WORKLOADS, clean_database
from conftest import ROOT, run_cli, serve, tiny_models
from device.runtime import CompiledVAR
from host.net import free_port
from host.net import stop_group as stop

LABELS = [0, 3]


def test_corrupt_records_are_skipped_with_a_warning(tmp_path):
    (tmp_path / WORKLOADS).write_text('["hash0", {"a": 1}]\n{not json\n["hash2", {"b": 2}]\n')
    (tmp_path / RECORDS).write_text('[0, [["trace"], [1.0]]]\n[1, [["trace"], [2.0]]]\n'
                                    'garbage\n[2, [["trace"], [3.0]]]\n[7, [["trace"], [4.0]]]\n')
    said = []
    assert clean_database(tmp_path, said.append) == 2
    assert len(said) == 4 and all("warning" in s for s in said) and f"{WORKLOADS}:2" in said[0]
    records = [json.loads(line) for line in (tmp_path / RECORDS).read_text().splitlines()]
    assert [r[0] for r in records] == [0, 1] and records[1][1][1] == [3.0]   # re-indexed to the kept workloads
    assert len((tmp_path / WORKLOADS).read_text().splitlines()) == 2


def test_tune_one_task_then_build_with_the_database(tiny_ckpts, tmp_path):
    var_path, vae_path = tiny_ckpts
    db = tmp_path / "db"
    r = run_cli("compiler.tune", "--target", "host", "--var", var_path, "--vae", vae_path, "--top", "1",
                "--trials", "2", "--round-trials", "1", "--db", db, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "round 2 done" in r.stderr
    records = [json.loads(line) for line in (db / RECORDS).read_text().splitlines()]
    # one or two (a round may find no candidate it has not measured); measured, not failed (1e10 s)
    assert 1 <= len(records) <= 2 and all(min(rec[1][1]) < 1.0 for rec in records)
    var, vae = tiny_models()
    tuned = build(var, vae, None, "host", 1, tmp_path / "tuned", tuning=db, log=lambda s: None)
    (tmp_path / "empty").mkdir()   # an empty database: no tuning (not even a committed one)
    plain = build(var, vae, None, "host", 1, tmp_path / "plain", tuning=tmp_path / "empty", log=lambda s: None)
    assert json.loads((tuned / "manifest.json").read_text())["tuning"] == str(db)
    assert json.loads((plain / "manifest.json").read_text())["tuning"] is None
    for c in range(var.num_classes):
        a = CompiledVAR(tuned).generate([c], cfg=4.0, top_k=1, top_p=0.0)[0]
        b = CompiledVAR(plain).generate([c], cfg=4.0, top_k=1, top_p=0.0)[0]
        assert np.array_equal(a, b)


# Tuning on a board over TVM RPC: TVM's own rpc_server (and tracker) on loopback play the board.
# One cheap task (a 4-call reduction of the tiny model) and one trial keep each run under a minute.
CHEAP_TASK = "fused_tir_square_sum"


def tune_cli(ckpts, db, *where, timeout=600):
    var_path, vae_path = ckpts
    return run_cli("compiler.tune", "--target", "host", "--var", var_path, "--vae", vae_path, "--tasks", CHEAP_TASK,
                   "--trials", "1", "--round-trials", "1", "--db", db, *where, timeout=timeout)


def measured(db) -> list:
    """The records in the database, each checked to be a measurement (not a failure, 1e10 s)."""
    records = [json.loads(line) for line in (db / RECORDS).read_text().splitlines()]
    assert len(records) == 1 and all(min(rec[1][1]) < 1.0 for rec in records)
    return records


def loaded_by(log) -> list[str]:
    """What the server loaded: one library per candidate, a shared object linked here."""
    lines = [line for line in log.read_text().splitlines() if "load_module" in line]
    assert all(line.endswith("candidate.so") for line in lines), lines
    return lines


def test_tune_on_a_board_over_rpc_then_build_gives_the_reference_tokens(tiny_ckpts, tmp_path):
    port, db = free_port(), tmp_path / "db"
    board = serve("tvm.exec.rpc_server", port=port, log=tmp_path / "board.log")
    try:
        r = tune_cli(tiny_ckpts, db, "--rpc", f"127.0.0.1:{port}")
    finally:
        stop(board)
    assert r.returncode == 0, r.stderr[-2000:]
    records = measured(db)
    assert len(loaded_by(tmp_path / "board.log")) >= len(records)   # measured there, not here
    var, vae = tiny_models()
    tuned = build(var, vae, None, "host", 1, tmp_path / "tuned", tuning=db, log=lambda s: None)
    assert json.loads((tuned / "manifest.json").read_text())["tuning"] == str(db)
    want, _ = generate(var, vae, LABELS, cfg=4.0, top_k=1, top_p=0.0)
    got = np.concatenate([CompiledVAR(tuned).generate([c], cfg=4.0, top_k=1, top_p=0.0)[0] for c in LABELS])
    np.testing.assert_array_equal(got, want.numpy())


def test_tune_on_a_board_through_a_tracker(tiny_ckpts, tmp_path):
    tport, port, db = free_port(), free_port(), tmp_path / "db"
    tracker = serve("tvm.exec.rpc_tracker", port=tport)
    board = serve("tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tport}", "--key", "tune-board", port=port,
                  log=tmp_path / "board.log")
    try:
        r = tune_cli(tiny_ckpts, db, "--tracker", f"127.0.0.1:{tport}", "--key", "tune-board")
    finally:
        stop(board)
        stop(tracker)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(loaded_by(tmp_path / "board.log")) >= len(measured(db))


def test_inputs_are_made_here_when_the_board_cannot_make_them():
    """A runtime-only TVM (host.emulate's, a board's) has no random_fill_for_measure."""
    import tvm

    from compiler.tune_worker import alloc_arguments

    class RuntimeOnly:
        def get_function(self, name):
            raise AttributeError(f"Module has no function '{name}'")
    [(x, idx)] = alloc_arguments(RuntimeOnly(), tvm.cpu(), [["TENSOR", "float32", [4, 8]], ["TENSOR", "int64", [3]]], 1)
    assert x.numpy().std() > 0 and (abs(x.numpy()) <= 1).all() and not idx.numpy().any()   # indices stay in bounds


def one_line_error(r, *words):
    """tune stopped with status 2 and a last line `error: …` holding `words`."""
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), last
    return last


def test_no_board_is_a_quick_one_line_error(tiny_ckpts, tmp_path):
    t0 = time.time()
    r = tune_cli(tiny_ckpts, tmp_path / "db", "--rpc", f"127.0.0.1:{free_port()}", "--timeout", "3")
    one_line_error(r, "--rpc", "not reachable")
    assert time.time() - t0 < 60
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "db").exists()   # nothing loaded or tuned
    tport = free_port()
    tracker = serve("tvm.exec.rpc_tracker", port=tport)
    try:
        t0 = time.time()
        r = tune_cli(tiny_ckpts, tmp_path / "db", "--tracker", f"127.0.0.1:{tport}", "--key", "nobody", "--timeout", "3")
        one_line_error(r, "--tracker", "no board with key 'nobody'")
        assert time.time() - t0 < 60
    finally:
        stop(tracker)
    r = tune_cli(tiny_ckpts, tmp_path / "db", "--tracker", f"127.0.0.1:{tport}")
    one_line_error(r, "--tracker needs --key", "'host'")
    r = tune_cli(tiny_ckpts, tmp_path / "db", "--rpc", "127.0.0.1:1", "--tracker", f"127.0.0.1:{tport}")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_board_gone_mid_run_stops_with_one_line_naming_rpc(tiny_ckpts, tmp_path):
    port, db, log = free_port(), tmp_path / "db", tmp_path / "board.log"
    board = serve("tvm.exec.rpc_server", port=port, log=log)
    p = subprocess.Popen([sys.executable, "-m", "compiler.tune", "--target", "host", "--var", str(tiny_ckpts[0]),
                          "--vae", str(tiny_ckpts[1]), "--tasks", CHEAP_TASK, "--trials", "1", "--round-trials", "1",
                          "--rpc", f"127.0.0.1:{port}", "--timeout", "3", "--db", str(db)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while "finish serving" not in log.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)   # tune checked that the board answers ...
    finally:
        stop(board)           # ... and the board goes away before the first candidate is measured
    _, err = p.communicate(timeout=600)
    last = one_line_error(subprocess.CompletedProcess(p.args, p.returncode, "", err), "--rpc", "not reachable")
    assert f"127.0.0.1:{port}" in last and "round 1:" in err   # it got as far as tuning
    assert not (db / RECORDS).read_text().strip()   # the failed round's records were dropped


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs qemu-user-static and g++-aarch64-linux-gnu")
def test_tune_for_rpi5_on_the_emulated_board_then_run_the_tuned_build_there(tiny_ckpts, tmp_path):
    """Candidates cross-linked here and measured by the runtime-only TVM of an emulated aarch64
    board (no compiler, no random_fill_for_measure there); the tuned rpi5 build gives the
    reference tokens on that board. Timings under qemu say nothing about a real Pi."""
    from host.emulate import CACHE
    from host.emulate import serve as emulate
    port, db = free_port(), tmp_path / "db"
    board = emulate(port, log=lambda s: print(s, file=sys.stderr))
    try:
        r = run_cli("compiler.tune", "--target", "rpi5", "--var", tiny_ckpts[0], "--vae", tiny_ckpts[1], "--tasks",
                    CHEAP_TASK, "--trials", "1", "--round-trials", "1", "--rpc", f"127.0.0.1:{port}", "--db", db,
                    timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(loaded_by(CACHE / f"rpc_server.{port}.log")) >= len(measured(db))
        var, vae = tiny_models()
        art = build(var, vae, None, "rpi5", 1, tmp_path / "rpi5", tuning=db, log=lambda s: None)
        assert json.loads((art / "manifest.json").read_text())["tuning"] == str(db)
        want, _ = generate(var, vae, LABELS, cfg=4.0, top_k=1, top_p=0.0)
        np.savez(tmp_path / "expect.npz", tokens=want.numpy(), labels=np.array(LABELS))
        r = run_cli("host.deploy", "--artifact", art, "--rpc", f"127.0.0.1:{port}", "--class", *map(str, LABELS),
                    "--expect", tmp_path / "expect.npz", "--timeout", "300", timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "100.00 % equal" in r.stdout
    finally:
        stop(board)
