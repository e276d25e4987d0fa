"""compiler.tune: MetaSchedule (XGBoost cost model) over the kernels no hand-written schedule
covers; the database is applied by compiler.build and does not change the tokens."""
import json

import numpy as np

from compiler.build import build
from compiler.tune import RECORDS, WORKLOADS, clean_database
from conftest import run_cli, tiny_models
from device.runtime import CompiledVAR


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
