"""The README's main job: the demo model built for jetson-orin here, its CPU build run on the
emulated board, greedy tokens equal to the PyTorch reference (slow: two demo builds and qemu)."""
import json
import shutil

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs qemu-user-static and g++-aarch64-linux-gnu")]


def test_quickstart_builds_for_orin_and_runs_on_the_emulated_board(tmp_path):
    r = run_cli("host.quickstart", "--target", "jetson-orin", "--class", "3", "--out", tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "100.00 % equal" in r.stdout
    orin = json.loads((tmp_path / "jetson-orin-nano" / "manifest.json").read_text())
    assert orin["device"] == "cuda" and orin["triple"].startswith("aarch64")
    assert json.loads((tmp_path / "board" / "deploy.json").read_text())["token_agreement"] == 1.0
    assert (tmp_path / "board" / "grid.png").is_file()
