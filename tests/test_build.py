"""Compiled builds against the PyTorch reference: same greedy tokens, same images; artifact checks."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from compiler.build import build
from compiler.compress.apply import apply_plan
from compiler.compress.plan import Plan, linear_layer_names, load_plan
from compiler.sampler import generate
from conftest import ROOT, run_cli, tiny_models
from device.artifact import ArtifactError
from device.runtime import CompiledVAR

LABELS = [0, 3]


def tiny_plan(var) -> Plan:
    """Bands, a dropped key scale, ASC on two scales and W8A8 everywhere but ffn.fc2."""
    cfg = var.cfg
    plan = Plan.empty(cfg)
    S = len(cfg.patch_nums)
    plan.windows = [[[[None] * (q + 1) for q in range(S)] for _ in range(cfg.heads)] for _ in range(cfg.depth)]
    plan.windows[0][0][3] = [None, 1, 2, 1]
    plan.windows[1][1][3] = [0, None, 1, 2]
    plan.windows[1][0][2] = [None, 1, 1]
    plan.asc_share = [[False, False, True, True], [False, False, False, True]]
    plan.asc_mode = "map"
    for name in linear_layer_names(cfg):
        if not name.endswith("ffn.fc2"):
            plan.quant_layers[name] = {"scheme": "w8a8", "group": None}
    return plan


def mixed_int4_plan(var, w4a8=True) -> Plan:
    """W4A8 and W4A16 at two group sizes next to W8A8, fp16 and fp32 layers (no W4A8: for OpenCL)."""
    plan = Plan.empty(var.cfg)
    four = "w4a8" if w4a8 else "w4a16"
    mixed = {"blocks.0.attn.mat_qkv": (four, 32), "blocks.0.attn.proj": ("w4a16", 64), "blocks.0.ffn.fc1": (four, 64),
             "blocks.0.ffn.fc2": ("w4a16", 32), "blocks.1.attn.mat_qkv": ("w8a8", None),
             "blocks.1.ffn.fc1": ("w4a16", 32), "blocks.1.ffn.fc2": ("fp16", None), "head": (four, 32)}
    for name, (scheme, group) in mixed.items():
        plan.quant_layers[name] = {"scheme": scheme, "group": group}
    return plan


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@pytest.fixture(scope="module")
def dense_artifact(tiny, tmp_path_factory):
    var, vae = tiny
    return build(var, vae, None, "host", 2, tmp_path_factory.mktemp("b") / "dense", log=lambda s: None)


def greedy(var, vae, labels, cfg=4.0):
    toks, imgs = generate(var, vae, labels, cfg=cfg, top_k=1, top_p=0.0)
    return toks.numpy(), imgs.numpy()


def test_dense_build_gives_the_reference_tokens_and_images(tiny, dense_artifact):
    var, vae = tiny
    want_t, want_i = greedy(var, vae, LABELS)
    got_t, got_i = CompiledVAR(dense_artifact).generate(LABELS, cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_allclose(got_i, want_i, atol=1e-3)
    # a short batch is padded and cut, and gives the same image as in a full batch
    one_t, one_i = CompiledVAR(dense_artifact).generate([3], cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(one_t[0], want_t[1])


def test_scale_calls_get_the_same_buffers_whatever_the_setting(tiny, dense_artifact):
    """A CUDA-graph build replays with the addresses it captured (compiler/build.py:
    static_scale_inputs), so the runtime must hand every scale call the same mods, CFG-weight
    and KV-cache buffers, with a new image's or setting's values copied in."""
    var, vae = tiny
    model, seen = CompiledVAR(dense_artifact), {}
    invoke = model._invoke

    def recording(name, *args):
        if name.startswith("scale_"):
            seen.setdefault(name, set()).add(tuple(a.data_ptr() for a in args[1:]))
        return invoke(name, *args)
    model._invoke = recording
    got = {cfg: model.generate(LABELS, cfg=cfg, top_k=1, top_p=0.0)[0] for cfg in (4.0, 1.5, 4.0)}
    assert all(len(ptrs) == 1 for ptrs in seen.values()) and len(seen) == len(var.cfg.patch_nums)
    np.testing.assert_array_equal(got[1.5], greedy(var, vae, LABELS, cfg=1.5)[0])
    np.testing.assert_array_equal(got[4.0], greedy(var, vae, LABELS)[0])


@pytest.mark.parametrize("mode", ["map", "output"])
def test_plan_build_gives_the_tokens_of_the_pytorch_simulation(tiny, tmp_path, mode):
    """ASC "output" sharing on to the last scale skips the unconditional half's attention
    (block 0 from scale 2, block 1 at scale 3); block 1's scale 1 shares alone and keeps it."""
    var, vae = tiny
    plan = tiny_plan(var)
    if mode == "output":
        plan.asc_mode, plan.asc_share = "output", [[False, False, True, True], [False, True, False, True]]
    path = tmp_path / "plan.json"
    plan.save(path)
    plan = load_plan(path, var.cfg)
    art = build(var, vae, plan, "host", 2, tmp_path / "plan_art", log=lambda s: None)
    want_t, _ = greedy(apply_plan(var, plan), vae, LABELS)
    got_t, _ = CompiledVAR(art).generate(LABELS, cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(got_t, want_t)
    assert json.loads((art / "manifest.json").read_text())["plan"]["asc"]["mode"] == mode


def test_8bit_attention_plan_build_gives_the_tokens_of_the_pytorch_simulation(tiny, tmp_path):
    """The tiny plan with quant.attention_bits = 8 (q, k, v and the weights of every scale on
    8-bit grids): the build no longer refuses it and gives the simulation's greedy tokens. The
    tiny model picks the same tokens without the 8-bit attention too, so its last scale's logits
    show that the build rounds: they move against the same plan's build without it."""
    var, vae = tiny
    plan = tiny_plan(var)
    plan.attention_bits = 8
    art = build(var, vae, plan, "host", 2, tmp_path / "a8", log=lambda s: None)
    want_t, want_img = greedy(apply_plan(var, plan), vae, LABELS)
    got_t, got_img = CompiledVAR(art).generate(LABELS, cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(got_t, want_t)
    assert np.abs(got_img - want_img).max() < 1e-3
    assert json.loads((art / "manifest.json").read_text())["plan"]["quant"]["attention_bits"] == 8

    def last_logits(artifact):
        model, seen = CompiledVAR(artifact), {}
        invoke = model._invoke
        model._invoke = lambda name, *a: seen.setdefault(name, invoke(name, *a))
        model.generate(LABELS, cfg=4.0, top_k=1, top_p=0.0)
        return seen[f"scale_{len(var.cfg.patch_nums) - 1}"][0].numpy()
    plan.attention_bits = None
    plain = build(var, vae, plan, "host", 2, tmp_path / "plain", log=lambda s: None)
    assert np.abs(last_logits(art) - last_logits(plain)).max() > 1e-4


def test_mixed_int4_plan_build_gives_the_tokens_of_the_pytorch_simulation(tiny, tmp_path):
    """W4A8 and W4A16 at two group sizes next to W8A8, fp16 and fp32 layers: greedy tokens equal;
    the fp16 layer's weights are float16 in the artifact."""
    var, vae = tiny
    plan = mixed_int4_plan(var)
    art = build(var, vae, plan, "host", 2, tmp_path / "w4", log=lambda s: None)
    want_t, _ = greedy(apply_plan(var, plan), vae, LABELS)
    got_t, _ = CompiledVAR(art).generate(LABELS, cfg=4.0, top_k=1, top_p=0.0)
    np.testing.assert_array_equal(got_t, want_t)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["plan"]["quant"]["layers"]["blocks.0.attn.proj"] == {"scheme": "w4a16", "group": 64}
    assert manifest["plan"]["quant"]["layers"]["blocks.1.ffn.fc2"] == {"scheme": "fp16", "group": None}
    C = var.cfg.width
    halves = [a for a in np.load(art / "params.npz").values() if a.dtype == np.float16 and a.size == C * var.cfg.mlp_hidden]
    assert len(halves) == 1


def test_tampered_or_missing_artifact_files_are_refused(dense_artifact, tmp_path):
    import shutil
    art = tmp_path / "a"
    shutil.copytree(dense_artifact, art)
    with open(art / "params.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="params.npz: sha256 does not match"):
        CompiledVAR(art)
    (art / "model.so").unlink()
    with pytest.raises(ArtifactError, match="model.so: listed in manifest.json but missing"):
        CompiledVAR(art)


def test_an_artifact_is_refused_on_a_cpu_without_its_extensions(dense_artifact, tmp_path):
    """The manifest lists the CPU extensions the build may use (those of its LLVM target); a CPU
    that lacks one gets a one-line error at load instead of an illegal instruction later."""
    import shutil

    import targets
    from device.artifact import missing_cpu_flags
    m = json.loads((dense_artifact / "manifest.json").read_text())
    assert m["cpu_flags"] == targets.load("host").cpu_flags and not missing_cpu_flags(m["cpu_flags"])
    if platform.machine() == "x86_64":
        assert {"avx2", "fma"} <= set(m["cpu_flags"])
    art = tmp_path / "a"
    shutil.copytree(dense_artifact, art)
    m["cpu_flags"] = m["cpu_flags"] + ["no_such_extension"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="built for a CPU with no_such_extension .*lacks; rebuild it"):
        CompiledVAR(art)
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c\n"
    assert missing_cpu_flags(["avx2", "avx_vnni", "fma"], x86, "x86_64") == ["avx_vnni"]
    arm = "processor\t: 0\nFeatures\t: fp asimd asimdhp\n"
    assert missing_cpu_flags(["asimddp"], arm, "aarch64") == ["asimddp"]
    assert missing_cpu_flags(["asimddp"], arm.replace("asimdhp", "asimddp asimdhp"), "aarch64") == []
    assert missing_cpu_flags(["asimddp"], x86, "aarch64") == []   # qemu-user shows the host's: cannot tell


def test_device_generate_runs_without_torch(dense_artifact, tmp_path):
    """The board has no PyTorch: run the CLI with `import torch` made to fail."""
    out = tmp_path / "gen"
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            "sys.argv = ['device.generate'] + sys.argv[1:]; runpy.run_module('device.generate', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--artifact", str(dense_artifact), "--class", "1", "4",
                        "-n", "2", "--seed", "3", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = np.load(out / "samples.npz")
    assert data["tokens"].shape == (4, 30) and data["images"].shape[0] == 4
    assert list(data["labels"]) == [1, 4, 1, 4]
    assert (out / "grid.png").is_file() and (out / "000_class1.png").is_file()


def test_build_cli_errors_are_one_line(tmp_path, tiny_ckpts):
    pv, pe = tiny_ckpts
    r = run_cli("compiler.build", "--target", "jetson-nowhere", "--var", pv, "--vae", pe, "--out", tmp_path / "x")
    assert r.returncode == 2 and "unknown target" in r.stderr and "host" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a plan made for another depth is refused, naming the plan file
    var, _ = tiny_models()
    plan = Plan.empty(var.cfg)
    plan.model["depth"] = 7
    plan.save(tmp_path / "other.json")
    r = run_cli("compiler.build", "--var", pv, "--vae", pe, "--plan", tmp_path / "other.json", "--out", tmp_path / "x")
    assert r.returncode == 2 and "other.json" in r.stderr and "depth" in r.stderr
    assert not (tmp_path / "x").exists()
    # an unwritable output directory
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:
        r = run_cli("compiler.build", "--var", pv, "--vae", pe, "--out", ro / "sub" / "art")
        assert r.returncode == 2 and "ro" in r.stderr


def test_device_generate_refuses_a_missing_artifact(tmp_path):
    r = run_cli("device.generate", "--artifact", tmp_path / "nothing", "--out", tmp_path / "o")
    assert r.returncode == 2 and "not an artifact directory" in r.stderr


def test_agree_refuses_depth_for_the_demo_model():
    r = run_cli("host.agree", "--model", "demo", "--depth", "2")
    assert r.returncode == 2 and "--depth applies to --model d16 only" in r.stderr


def test_device_bench_times_every_function(dense_artifact, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("device.bench", "--artifact", dense_artifact, "-n", "2", "--warmup", "1", "--top-k", "1",
                "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["images_timed"] == 4 and res["median_s_per_image"] > 0   # batch 2 × 2 generations
    names = set(res["functions_median_ms"])
    assert {"embed", "scale_0", "scale_3", "next_0", "last", "decode", "sample_0", "sample_3"} <= names
    assert res["sampler"] == "kernel"
    r = run_cli("device.bench", "--artifact", dense_artifact, "--class", "99")
    assert r.returncode == 2 and "--class 99" in r.stderr
    # two artifacts side by side (here the same one twice): both timed, ratio to the first
    r = run_cli("device.bench", "--artifact", dense_artifact, "--artifact", dense_artifact, "-n", "1",
                "--warmup", "0", "--top-k", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    both = json.loads(out.read_text())
    assert len(both) == 2 and all(b["images_timed"] == 2 for b in both) and "x the first" in r.stdout
    # the compiled sampler against numpy's, on one artifact: the second run calls no sample_<s>
    r = run_cli("device.bench", "--artifact", dense_artifact, "--numpy-sampler-too", "-n", "1", "--warmup", "0",
                "--out", out)
    assert r.returncode == 0, r.stderr
    kernel, numpy_ = json.loads(out.read_text())
    assert (kernel["sampler"], numpy_["sampler"]) == ("kernel", "numpy")
    assert "sample_0" in kernel["functions_median_ms"] and "sample_0" not in numpy_["functions_median_ms"]
