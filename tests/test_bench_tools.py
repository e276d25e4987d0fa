"""The measuring tools themselves: thread count, kernel microbenchmarks, the speed-test plan."""
import json
import os
import subprocess
import sys

import pytest

from compiler.compress.plan import load_plan
from compiler.compress.mdwa import kept_pairs
from conftest import ROOT, run_cli
from device.cores import physical_cores
from schedules import gpu_bench


def test_tvm_uses_every_physical_core():
    """TVM alone would take half the logical CPUs of an x86 (one core of this 2-vCPU machine)."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = "import device, tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == physical_cores()
    env["TVM_NUM_THREADS"] = "1"   # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 1


def test_interleaved_timing_lets_each_engine_start_on_quiet_cores(monkeypatch):
    """Every timing in schedules.bench's rounds starts after a settle() (the last runtime's
    spinning threads slowed the next engine by up to 1.4×), side_by_side's after one call too."""
    from schedules import bench
    events, real_timed = [], bench.timed
    monkeypatch.setattr(bench, "settle", lambda: events.append("settle"))
    monkeypatch.setattr(bench, "timed", lambda call, n: (events.append("timed"), real_timed(call, n))[1])
    engines = {"a": lambda: events.append("call"), "b": lambda: events.append("call")}
    bench.side_by_side(engines, 3, target_s=0)
    rounds = events[events.index("settle"):]
    assert rounds == ["settle", "call", "timed", "call"] * (2 * 3)
    del events[:]
    ratios = bench.paired_ratios(engines, "a", 2)
    assert events[2:] == ["settle", "timed", "call", "call"] * (2 * 2)
    assert ratios["a"] == 1.0 and ratios["b"] > 0


def test_schedules_bench_reports_every_kernel(tmp_path):
    r = run_cli("schedules.bench", "--model", "demo", "--repeat", "1", "--out", tmp_path / "k.json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "k.json").read_text())
    engines = {d["engine"] for d in report["dense"]}
    assert {"tvm fp32", "tvm w8a8", "tvm w4a16", "tvm w4a8", "torch fp32"} <= engines
    assert len(report["dense"]) == 5 * len(engines)          # five layer shapes
    att = {a["engine"]: a for a in report["attention"]}
    assert att["dense"]["kept_fraction"] == 1.0 and att["dense"]["cost_per_kept_paired"] == 1.0
    assert all(a["cost_per_kept_paired"] > 0 for k, a in att.items() if not k.startswith("torch"))
    assert att["torch SDPA (dense)"]["cost_per_kept_paired"] is None and "÷ kept, 2 calls" in r.stdout
    # narrower windows keep fewer pairs; ASC halves the q·k part
    assert att["MDWA w=64"]["kept_fraction"] > att["MDWA w=16"]["kept_fraction"] > att["MDWA w=4"]["kept_fraction"]
    assert att["MDWA w=16 + ASC output"]["kept_fraction"] == att["MDWA w=16"]["kept_fraction"] / 2
    assert att["MDWA w=16 + ASC cond"]["kept_fraction"] == att["MDWA w=16 + ASC output"]["kept_fraction"]
    assert att["8-bit attention, MDWA w=16"]["kept_fraction"] == att["MDWA w=16"]["kept_fraction"]
    assert report["peak_gflops"] > 0 and "time / dense" in r.stdout
    if report["int_peak_gops"] is not None:   # x86 with vpmaddwd: int8 rows also against the integer peak
        ints = [d for d in report["dense"] if d["of_int_peak"] is not None]
        assert {d["engine"] for d in ints} == {"tvm w8a8", "torch int8 (fbgemm)"} and "of int peak" in r.stdout
        assert all(abs(d["of_int_peak"] * report["int_peak_gops"] - d["gflops"]) < 1e-6 * d["gflops"] for d in ints)
    convs = {(c["Ci"], c["Co"], c["side"]) for c in report["conv"]}
    assert (64, 64, 32) in convs and {c["engine"] for c in report["conv"]} == {"tvm conv", "torch conv2d", "tvm winograd"}
    winograd = {(c["Ci"], c["Co"], c["side"]) for c in report["conv"] if c["engine"] == "tvm winograd"}
    assert {(64, 64, 32), (64, 64, 16)} <= winograd and (32, 3, 32) not in winograd
    assert {(c["Ci"], c["Co"], c["side"]) for c in report["conv"] if c["k"] == 1} == {(64, 32, 32)}   # 1×1: no Winograd
    assert "Decoder convolutions" in r.stdout and "GroupNorm" in r.stdout
    assert {g["engine"] for g in report["groupnorm"]} == {"tvm groupnorm+silu", "torch groupnorm+silu"}
    samp = {a["engine"]: a for a in report["sampling"]}
    assert set(samp) == {"tvm sample_rows", "numpy (device/sampling.py)", "torch (reference sampler)"}
    assert samp["tvm sample_rows"]["tokens"] == 680 and samp["numpy (device/sampling.py)"]["vs_numpy"] == 1.0
    assert "Sampling one image's 680 tokens" in r.stdout
    bad = run_cli("schedules.bench", "--repeat", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --repeat must be at least 1, got 0"


def test_speed_plan_keeps_coarse_scales_dense_and_protects_fc2(tmp_path):
    r = run_cli("compiler.speed_plan", "--model", "demo", "--window", "8", "--out", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    plan = load_plan(tmp_path / "p.json")
    pns = plan.model["patch_nums"]
    last = plan.windows[0][0][len(pns) - 1]
    assert last[:3] == [None] * 3 and set(last[3:]) == {8}
    assert all(w is None for w in plan.windows[0][0][4])      # query scale 4: dense
    assert kept_pairs(last, pns, len(pns) - 1) < sum(p * p for p in pns) * pns[-1] ** 2
    assert plan.asc_share[0][6] and not plan.asc_share[0][5]
    assert plan.quant_layers["blocks.0.ffn.fc2"]["scheme"] == "fp16"   # 16 bit, as LiteVAR's code keeps it
    assert plan.quant_layers["blocks.0.ffn.fc1"]["scheme"] == "w8a8"
    r = run_cli("compiler.speed_plan", "--model", "demo", "--fc2", "w8a8", "--out", tmp_path / "all.json")
    assert r.returncode == 0, r.stderr
    assert load_plan(tmp_path / "all.json").quant_layers["blocks.3.ffn.fc2"]["scheme"] == "w8a8"
    r = run_cli("compiler.speed_plan", "--model", "demo", "--fc2", "fp32", "--out", tmp_path / "f32.json")
    assert r.returncode == 0, r.stderr
    assert "blocks.3.ffn.fc2" not in load_plan(tmp_path / "f32.json").quant_layers


def test_host_bench_times_each_image_after_a_pause_and_an_untimed_image(monkeypatch):
    from host import bench
    events = []
    monkeypatch.setattr(bench, "settle", lambda: events.append("settle"))
    engines = {name: (lambda c, s, name=name: events.append((name, c, s))) for name in ("a", "b")}
    times = bench.timed_images(engines, 3, 2, log=lambda s: None)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert events == [e for i in range(3) for n in "ab" for e in ("settle", (n, i % 2, i), (n, i % 2, i))]


def test_host_bench_gives_the_speed_up_of_each_round():
    from host.bench import round_speedups
    r = round_speedups({"pytorch": [10.0, 12.0, 9.0], "tvm": [5.0, 4.0, 4.5], "ort": [10.0, 6.0, 4.5]})
    assert set(r) == {"tvm", "ort"}
    assert r["tvm"]["per_round"] == [2.0, 3.0, 2.0] and r["tvm"]["median"] == 2.0
    assert (r["ort"]["min"], r["ort"]["median"], r["ort"]["max"]) == (1.0, 2.0, 2.0)


def test_host_bench_keeps_the_artifacts_it_builds_where_asked(monkeypatch, tmp_path):
    from host import bench
    seen = {}

    def fake_ensure(args, var, vae, work, log):
        seen["work"] = work
        args.plan_artifact = work / "plan"

    def fake_measure(args, var, vae, log):
        seen["plan"] = args.plan_artifact
        return {"pytorch_s": 2.0, "all_median_s": {"pytorch": 2.0, "tvm_plan": 1.0}, "peak_mb": {"pytorch": 1, "tvm_plan": 1},
                "speedup_per_round": {}}
    monkeypatch.setattr(bench, "load_reference", lambda model: (None, None))
    monkeypatch.setattr(bench, "ensure_artifacts", fake_ensure)
    monkeypatch.setattr(bench, "measure", fake_measure)
    keep = tmp_path / "kept"
    bench.main(["--engines", "pytorch,tvm_plan", "--keep-artifacts", str(keep), "--out", str(tmp_path / "b.json")])
    assert seen == {"work": keep, "plan": keep / "plan"}
    (keep / "plan").mkdir(parents=True)
    r = run_cli("host.bench", "--keep-artifacts", keep, "--out", tmp_path / "c.json")
    assert r.returncode == 2 and f"--keep-artifacts {keep}: exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.json").exists()


def test_host_bench_names_an_unknown_engine(tmp_path):
    r = run_cli("host.bench", "--engines", "pytorch,tensorrt", "--out", tmp_path / "b.json")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --engines: unknown engine 'tensorrt'; known: pytorch, onnxruntime, tvm_dense, tvm_plan"
    assert not (tmp_path / "b.json").exists()


def test_gpu_bench_refuses_cpu_targets_and_missing_libraries(tmp_path):
    r = run_cli("schedules.gpu_bench", "build", "--target", "rpi5", "--out", tmp_path / "g")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --target rpi5: runs kernels on cpu; this benchmark is for GPU boards"
    assert not (tmp_path / "g").exists()
    r = run_cli("schedules.gpu_bench", "run", tmp_path)
    assert r.returncode == 2 and "no shapes.json" in r.stderr


def test_gpu_bench_run_side_needs_no_compiler(tmp_path):
    """`run` executes where only the TVM runtime is installed: it packs the dp4a weight and fills
    the KV cache with the compiler's own layouts (schedules/packing.py, schedules/kv_layout.py)
    without importing the kernels or the compiler."""
    code = f"""if True:
        import sys
        for m in ("compiler", "schedules.qmatmul", "schedules.matmul", "schedules.attention"):
            sys.modules[m] = None   # importing any of them raises ImportError (this full TVM's own
                                    # `import tvm` loads tvm.script; a runtime-only one has none)
        from pathlib import Path
        import schedules.packing
        assert not any(m == "tvm" or m.startswith("tvm.") for m, mod in sys.modules.items() if mod)
        from schedules import gpu_bench
        _, _, q, s = gpu_bench.inputs(8, 12, 20)
        w = gpu_bench.weight("dp4a", q, s)
        assert w.shape == (3, 20, 4) and w.flags.c_contiguous
        assert all(w[k // 4, o, k % 4] == q[o, k] for o in range(20) for k in range(12))
        q, kv = gpu_bench.attention_inputs()
        cache = gpu_bench.kv_layout.cache_of(kv, gpu_bench.ATTN["pns"])
        assert q.shape == (2, 16, 256, 64) and cache.shape == (2, 2, 16, 720 * 64)
        try:
            gpu_bench.run(Path({str(tmp_path)!r}), 1)
        except gpu_bench.UserError as e:
            assert "no shapes.json" in str(e)
        else:
            raise AssertionError("run accepted a directory without shapes.json")
        """
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_gpu_bench_runs_the_opencl_attention_through_pyopencl_without_tvm(tmp_path):
    """An OpenCL board's directory holds OpenCL C; `run` launches it with pyopencl alone (PoCL
    here), checks the 16-byte-load kernel against numpy (dense) and the single-float one."""
    pytest.importorskip("pyopencl")
    from schedules.gpu_bench import OPENCL_KERNELS, UserError, opencl_queue
    try:
        opencl_queue()
    except UserError as e:
        pytest.skip(str(e))
    r = run_cli("schedules.gpu_bench", "build", "--target", "mali-g610", "--out", tmp_path / "g")
    assert r.returncode == 0, r.stderr
    sources = sorted(p.name for p in (tmp_path / "g").glob("*.cl"))
    assert len(sources) == 6 * len(OPENCL_KERNELS) and "attn_rows_w4.cl" in sources
    code = (f"import sys; sys.modules['tvm'] = None; from schedules.gpu_bench import main; "
            f"main(['run', {str(tmp_path / 'g')!r}, '--number', '1', '--json', {str(tmp_path / 'r.json')!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {(x["attention"], x["kernel"]) for x in rows} == {
        (case, k) for case in ("dense", "w64", "w16", "w4", "w16_asc_map", "w16_asc_output") for k in OPENCL_KERNELS}
    assert all(x["us"] > 0 and x["max_diff"] < 1e-5 for x in rows)


@pytest.mark.slow
def test_gpu_bench_builds_every_kernel(tmp_path):
    r = run_cli("schedules.gpu_bench", "build", "--target", "jetson-orin", "--out", tmp_path / "g", timeout=900)
    assert r.returncode == 0, r.stderr
    libs = {p.name for p in (tmp_path / "g").glob("*.so")}
    g = gpu_bench
    matmuls = (len(g.SHAPES) * len(g.KINDS) + 2 * len(g.FEW_ROWS_LAYERS) * len(g.FEW_ROWS_W8A8)
               + len(g.FEW_ROWS_LAYERS) * len(g.FEW_ROWS) * len(g.FEW_ROWS_KINDS))
    assert len(libs) == matmuls + len(g.attention_cases()) * len(g.ATTN_KERNELS) and "attn_tiled_w4.so" in libs
    assert {"few_rows_fp16_2x4096x1024.so", "dp4a_rows_8x1024x3072.so", "dlight_int8_338x1024x1024.so"} <= libs
    assert (tmp_path / "g" / "shapes.json").is_file()


def test_gpu_side_by_side_bench_runs_on_the_cpu_without_a_gpu(tmp_path, tiny_ckpts, tiny_build):
    """host.bench_gpu without a GPU: PyTorch and a host build of the same checkpoint take turns,
    the build's image equals PyTorch's, and an artifact of another model is refused in one line."""
    from dataclasses import replace

    from compiler.build import build
    from conftest import TINY_VAR, tiny_models
    pv, pe = tiny_ckpts
    art = tiny_build("host")     # the same weights as the checkpoint files
    r = run_cli("host.bench_gpu", "--var", pv, "--vae", pe, "--artifact", art, "-n", "2", "--out", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["median_ms"]) == {"pytorch", art.name} and len(res["all_s"][art.name]) == 2
    assert res["image_max_diff_vs_pytorch"][art.name] < 1e-5 and res["speedup_vs_pytorch"][art.name] > 0
    assert {"fp32", "tf32"} == set(res["pytorch_decoder_ms"])
    other = build(*tiny_models(var_cfg=replace(TINY_VAR, depth=1)), None, "host", 1, tmp_path / "other",
                  log=lambda s: None)
    r = run_cli("host.bench_gpu", "--var", pv, "--vae", pe, "--artifact", other, "-n", "1")
    assert r.returncode != 0 and "built for depth 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
