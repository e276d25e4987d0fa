"""Boards: every target file loads, and builds for other boards are cross-linked and checked
(ELF machine, embedded GPU code that compiles for the board's arch)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import targets
from compiler.build import build, check_cross_compiler, find_nvcc
from conftest import run_cli, tiny_models
from device.artifact import ArtifactError
from device.errors import UserError
from device.runtime import CompiledVAR
from test_build import mixed_int4_plan, tiny_plan

needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                 reason="g++-aarch64-linux-gnu is not installed")


def has_opencl() -> bool:
    try:
        import pyopencl as cl
        return bool(cl.get_platforms()[0].get_devices())
    except Exception:  # noqa: BLE001
        return False


def elf_machine(path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


@pytest.mark.parametrize("name", targets.known())
def test_every_target_file_loads(name):
    b = targets.load(name)
    assert b.device in ("cpu", "cuda", "opencl") and b.target["kind"] in ("llvm", "cuda", "opencl")
    assert b.gpu == (b.host is not None)          # GPU boards name the CPU their host code runs on
    assert b.cross is None or b.cross["package"]  # a cross compiler comes with its Debian package
    b.tvm_target()                                # TVM accepts the target dicts


def test_jetson_orin_is_an_orin_with_the_right_cpu():
    b = targets.load("jetson-orin")
    assert b.target["arch"] == "sm_87" and b.host["mcpu"] == "cortex-a78ae" and b.triple.startswith("aarch64")


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown target.*jetson-orin.*rpi5"):
        targets.load("jetson-nowhere")


def test_missing_cross_compiler_names_the_package():
    b = targets.load("rpi5")
    b.cross = {"compiler": "no-such-g++", "package": "g++-aarch64-linux-gnu"}
    with pytest.raises(UserError, match="no-such-g\\+\\+ not found.*apt-get install g\\+\\+-aarch64-linux-gnu"):
        check_cross_compiler(b)


@pytest.fixture(scope="module")
def tiny():
    return tiny_models()


@needs_cross
def test_jetson_orin_build_is_aarch64_with_sm87_cuda_kernels(tiny, tmp_path):
    """A plan with MDWA, ASC, W8A8, the int4 schemes and 8-bit attention: every kernel
    compiles for sm_87."""
    var, vae = tiny
    plan = tiny_plan(var)
    plan.quant_layers.update(mixed_int4_plan(var).quant_layers)
    plan.attention_bits = 8
    art = build(var, vae, plan, "jetson-orin", 1, tmp_path / "orin", log=lambda s: None)
    m = json.loads((art / "manifest.json").read_text())
    assert elf_machine(art / "model.so") == 183                   # EM_AARCH64
    code = m["device_code"]
    assert m["device"] == "cuda" and code["kind"] == "cuda" and code["kernels"] > 10
    assert m["cuda_graph"] and b"vm.builtin.cuda_graph.run_or_capture" in (art / "model.so").read_bytes()
    if find_nvcc():   # every kernel compiled ahead of time for Orin: SASS for sm_87 and PTX
        assert "sm_87" in code["checked_with"] and code["format"] == "fatbin"
        fatbin = (art / code["file"]).read_bytes()
        assert fatbin[:4] == bytes.fromhex("50ed55ba")             # the fatbin magic
        assert code["file"] in m["files"] and len(code["source_sha256"]) >= 1
        cuobjdump = Path(find_nvcc()).with_name("cuobjdump")
        if cuobjdump.exists():
            listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", art / code["file"]],
                                     capture_output=True, text=True).stdout
            assert "sm_87" in listing and ".ptx" in listing
            sass = subprocess.run([cuobjdump, "-sass", art / code["file"]], capture_output=True, text=True).stdout
            assert "IDP.4A" in sass                                # W8A8 runs on dp4a
    # the artifact says what it is built for, and this x86 machine refuses to load it
    with pytest.raises(ArtifactError, match="built for aarch64"):
        CompiledVAR(art)


def test_cuda_builds_replay_static_launch_runs_as_cuda_graphs(tiny):
    """With cuda_graph (compiler.build's default for CUDA) a scale function hands its launches,
    the KV-cache write and the attention included, to the VM's CUDA-graph builtin; only a few
    kernels that read x stay outside. Without, every kernel is its own call."""
    import tvm

    from compiler.build import compile_module, lower
    var, vae = tiny
    mod, _ = lower(var, vae, None, 1, "cuda")
    mod = tvm.IRModule({gv: f for gv, f in mod.functions.items()
                        if gv.name_hint == "scale_1" or not isinstance(f, tvm.relax.Function)})
    board = targets.load("h100")

    def kernels(cg):   # VM function → the kernels it calls (not the VM's builtins)
        text = compile_module(mod, board, None, cg).as_text()
        blocks = re.split(r"^@(\w+):$", text, flags=re.M)
        return {name: re.findall(r"^  call  (?!vm\.builtin)(\w+)\s+in:", body, flags=re.M)
                for name, body in zip(blocks[1::2], blocks[2::2])}
    plain, graphs = kernels(False), kernels(True)
    assert any("attention" in k for k in plain["scale_1"]) and not any("cuda_graph" in f for f in plain)
    # scale 1's 2 × 4 rows: every dense layer on the kernel for few rows, none left to DLight
    assert any("dense_rows" in k for k in plain["scale_1"]) and not any("matmul" in k for k in plain["scale_1"])
    captured = [k for f, ks in graphs.items() if f.startswith("scale_1_cuda_graph_capture") for k in ks]
    assert len(graphs["scale_1"]) <= 4 and len(graphs["scale_1"]) + len(captured) == len(plain["scale_1"])
    assert any("attention" in k for k in captured) and any("kv_write" in k for k in captured)


@pytest.mark.parametrize("band_bytes", [64 << 20, 1])
def test_gpu_decoder_runs_convs_as_matmuls_and_matches_pytorch(tiny, band_bytes, monkeypatch):
    """GPU builds run every 3×3 and 1×1 convolution as im2col + one matmul (Relax's conv2d reaches
    DLight as an implicit GEMM that gathers its input element by element) and GroupNorm as sums
    in two steps (Relax's group_norm is one thread block). The same graph, compiled for this CPU,
    decodes a batch of 2 as PyTorch does, also with the columns taken one row at a time."""
    import numpy as np
    import torch
    import tvm
    from tvm.relax.frontend import nn

    from compiler.build import lower, pipeline
    from compiler.lower import vqvae_graph
    from compiler.lower.vqvae_graph import VQVAEGraph
    monkeypatch.setattr(vqvae_graph, "BAND_BYTES", band_bytes)
    var, vae = tiny
    names = [gv.name_hint for gv in lower(var, vae, None, 1, "cuda")[0].functions]
    assert any(n.startswith("im2col") for n in names)
    assert not any("conv2d" in n or "group_norm" in n for n in names)

    class Decode(nn.Module):
        def __init__(self):
            self.g = VQVAEGraph(vae, var.cfg, "cuda")

        def forward(self, f_hat):
            return self.g.decode(f_hat)
    P = var.cfg.patch_nums[-1]
    f_hat = torch.randn(2, vae.quantize.embedding.weight.shape[1], P, P, generator=torch.Generator().manual_seed(0))
    mod, params = Decode().export_tvm(spec={"forward": {"f_hat": nn.spec.Tensor(list(f_hat.shape), "float32"),
                                                        "$": {"param_mode": "plain", "effect_mode": "none"}}})
    cpu = tvm.target.Target("llvm")
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=cpu, relax_pipeline=pipeline(cpu)), tvm.cpu())
    got = vm["forward"](tvm.runtime.tensor(f_hat.numpy()), *[tvm.runtime.tensor(p.np_value) for _, p in params]).numpy()
    with torch.no_grad():
        want = vae.fhat_to_img(f_hat).add(1).mul(0.5).numpy()
    assert np.abs(got - want).max() < 1e-5


def test_cuda_dense_layers_of_few_rows_run_on_the_few_rows_kernels(tiny):
    """The tiny model's scales have at most 2 × 16 rows: its fp32 layers (ffn.fc2 in the plan)
    run on matmul.dense_rows_gpu, its W8A8 layers on qmatmul.dense_w8a8_dp4a_rows, none on
    DLight's matmul or the tiled dp4a kernel; OpenCL builds keep DLight's."""
    from compiler.build import lower
    var, vae = tiny
    names = lambda mod: [gv.name_hint for gv in mod.functions]  # noqa: E731
    cuda = names(lower(var, vae, tiny_plan(var), 1, "cuda")[0])
    assert any(n.startswith("dense_rows") for n in cuda) and any(n.startswith("dense_w8a8_dp4a_rows") for n in cuda)
    assert not any(n.startswith("dense_w8a8_dp4a") and "rows" not in n for n in cuda)
    assert not any(n.startswith("dense_rows") for n in names(lower(var, vae, tiny_plan(var), 1, "opencl")[0]))


def test_cuda_fp16_layers_of_few_rows_read_float16_weights(tiny):
    """fc2 in fp16 (LiteVAR's 16-bit fc2): on CUDA its few-row layers run on dense_rows_gpu reading
    the float16 weights themselves, no float32 copy cast ahead of them."""
    from compiler.build import lower
    var, vae = tiny
    plan = tiny_plan(var)
    for b in range(var.cfg.depth):
        plan.quant_layers[f"blocks.{b}.ffn.fc2"] = {"scheme": "fp16", "group": None}
    mod = lower(var, vae, plan, 1, "cuda")[0]
    rows = [f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("dense_rows")]
    assert rows and all(re.search(r"w: T.Buffer\(\(T.int64\(\d+\), T.int64\(\d+\)\), \"float16\"\)", r) for r in rows)
    assert not any(gv.name_hint.startswith("astype") for gv in mod.functions), [gv.name_hint for gv in mod.functions]


@needs_cross
@pytest.mark.parametrize("name,device", [("mali-g610", "opencl"), ("rpi5", "cpu")])
def test_arm_builds_are_aarch64(tiny, tmp_path, name, device):
    """Mali with a W4A16/W8A8 plan and 8-bit attention: PoCL compiles the OpenCL of the int4
    kernels and of the two-walk attention too."""
    var, vae = tiny
    plan = mixed_int4_plan(var, w4a8=False) if device == "opencl" else None
    if plan is not None:
        plan.attention_bits = 8
    art = build(var, vae, plan, name, 1, tmp_path / name, log=lambda s: None)
    m = json.loads((art / "manifest.json").read_text())
    assert elf_machine(art / "model.so") == 183 and m["device"] == device
    if device == "opencl":
        assert m["device_code"]["kind"] == "opencl" and m["device_code"]["kernels"] > 10
        if has_opencl():   # CI: PoCL compiles every generated kernel
            assert m["device_code"]["checked_with"]
    else:
        assert m["device_code"] is None


def test_w4a8_is_refused_for_opencl_before_any_work(tiny, tmp_path):
    var, vae = tiny
    with pytest.raises(UserError, match="plan.json: quant.layers.blocks.0.attn.mat_qkv: w4a8 has no OpenCL kernel"):
        build(var, vae, mixed_int4_plan(var), "mali-g610", 1, tmp_path / "m", plan_path="plan.json",
              log=lambda s: None)
    assert not (tmp_path / "m").exists()


@needs_cross
def test_device_cpu_puts_a_gpu_board_on_its_cpu_cores(tiny, tmp_path):
    """--device cpu: the Orin's Cortex-A78AE runs everything (what the emulated board can run)."""
    var, vae = tiny
    art = build(var, vae, None, "jetson-orin", 1, tmp_path / "orin-cpu", device="cpu", log=lambda s: None)
    m = json.loads((art / "manifest.json").read_text())
    assert m["device"] == "cpu" and m["device_code"] is None and m["tvm_target"]["mcpu"] == "cortex-a78ae"
    assert elf_machine(art / "model.so") == 183
    with pytest.raises(UserError, match="--device opencl: jetson-orin-nano runs kernels on cpu or cuda"):
        build(var, vae, None, "jetson-orin", 1, tmp_path / "x", device="opencl", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_no_cuda_graph_builds_launch_every_kernel_on_its_own(tiny_ckpts, tmp_path):
    pv, pe = tiny_ckpts
    r = run_cli("compiler.build", "--target", "h100", "--var", pv, "--vae", pe, "--no-cuda-graph",
                "--out", tmp_path / "h100")
    assert r.returncode == 0, r.stderr
    assert "CUDA graphs: off" in r.stderr
    assert json.loads((tmp_path / "h100" / "manifest.json").read_text())["cuda_graph"] is False
    assert b"vm.builtin.cuda_graph" not in (tmp_path / "h100" / "model.so").read_bytes()
