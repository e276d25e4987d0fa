"""Each kernel of schedules/ alone against a numpy reference, on odd shapes."""
import dataclasses
import platform
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from compiler.compress.mdwa import scale_mask
from compiler.compress.quant import W4A8, W4A16, W8A8, pack_int4, quantize_per_token_int8
from compiler.errors import UserError
from schedules import attention, kv_layout, matmul, qmatmul

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
DEV = tvm.cpu()


def run(func, *arrays, out):
    ex = tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=TARGET)
    outs = [tvm.runtime.empty(shape, dtype, DEV) for shape, dtype in out]
    ex["f"](*[tvm.runtime.tensor(a, DEV) for a in arrays], *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("M,K,O", [(2, 64, 48), (18, 40, 32), (50, 128, 16), (7, 8, 16)])
def test_dense_fp32_matches_numpy(M, K, O):
    rng = np.random.default_rng(M)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (O, K), (O,)))
    (y,) = run(matmul.dense_fp32(M, K, O), x, matmul.pack_weight(w), b, out=[((M, O), "float32")])
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,K,O,gelu", [(18, 40, 32, False), (7, 24, 16, True)])
def test_dense_with_float16_weights_matches_numpy(M, K, O, gelu):
    """Plan scheme fp16: float16 panels, widened in the kernel, float32 arithmetic."""
    rng = np.random.default_rng(M)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (O, K), (O,)))
    w16 = w.astype(np.float16)
    (y,) = run(matmul.dense_fp32(M, K, O, gelu, "float16"), x, matmul.pack_weight(w16), b, out=[((M, O), "float32")])
    def ref(weight):
        z = torch.from_numpy(x @ weight.astype(np.float32).T + b).double()
        return (torch.nn.functional.gelu(z, approximate="tanh") if gelu else z).numpy()
    np.testing.assert_allclose(y, ref(w16), rtol=1e-5, atol=1e-4)
    assert np.abs(y - ref(w)).max() > 1e-4   # the float16 rounding shows


@pytest.mark.parametrize("M,K,O", [(18, 40, 32), (66, 64, 48)])
def test_dense_fp32_gelu_epilogue_matches_torch(M, K, O):
    rng = np.random.default_rng(M)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (O, K), (O,)))
    (y,) = run(matmul.dense_fp32(M, K, O, gelu=True), x, matmul.pack_weight(w), b, out=[((M, O), "float32")])
    want = torch.nn.functional.gelu(torch.from_numpy(x @ w.T + b).double(), approximate="tanh").numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


def assert_builds_for_sm87(src: str, tmp_path):
    """Where nvcc is installed: the CUDA source compiles for sm_87 without register spills, its
    shared memory within the 48 KB a kernel gets without opting in."""
    import re
    import subprocess

    from compiler.build import find_nvcc
    if find_nvcc():
        (tmp_path / "a.cu").write_text(src)
        r = subprocess.run([find_nvcc(), "-arch=sm_87", "-cubin", "-Xptxas", "-v", "-o", tmp_path / "a.cubin",
                            tmp_path / "a.cu"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        smem = int(re.search(r"(\d+) bytes smem", r.stdout + r.stderr).group(1))
        assert 0 < smem <= 48 * 1024 and "spill" not in re.sub(r"0 bytes spill", "", r.stdout + r.stderr)


@pytest.mark.parametrize("M,K,O,gelu,wdtype", [(2, 64, 128, False, "float32"), (9, 40, 30, True, "float32"),
                                                 (18, 33, 64, False, "float32"), (1, 8, 4, True, "float32"),
                                                 (2, 64, 128, True, "float16"), (9, 33, 30, False, "float16")])
def test_gpu_dense_for_few_rows_matches_numpy(M, K, O, gelu, wdtype):
    """The GPU kernel for few rows, its block and thread loops run serially here: 9 and 18 rows
    are several row tiles (the last one partial), 30 columns take single-float loads and a
    partial column tile, 33 input channels do not divide between the 32 thread rows; float16
    weights (plan scheme fp16) are widened to float32 as they are loaded."""
    rng = np.random.default_rng(M + K)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (O, K), (O,)))
    w = w.astype(wdtype)
    (y,) = run(matmul.dense_rows_gpu(M, K, O, gelu, bound=False, wdtype=wdtype), x, matmul.pack_weight(w, gpu=True),
               b, out=[((M, O), "float32")])
    want = torch.from_numpy(x.astype(np.float64) @ w.T.astype(np.float64) + b)
    want = torch.nn.functional.gelu(want, approximate="tanh") if gelu else want
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("wdtype,load", [("float32", r"\*\(float4\*\)\(w_ptr \+"), ("float16", r"\*\(half4\*\)\(w_ptr \+")])
def test_gpu_dense_for_few_rows_compiles_for_orin_with_whole_weight_loads(tmp_path, wdtype, load):
    """d16's fc2 at VAR's first scale (2 rows, 4096 → 1024) for sm_87: one load of 4 columns of W
    per thread and input channel (16 bytes of float32, 8 of float16), the partial sums in shared
    memory within the 48 KB a kernel gets."""
    import re

    import targets
    f = matmul.dense_rows_gpu(2, 4096, 1024, True, wdtype=wdtype)
    ex = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}),
                     target=targets.load("jetson-orin").tvm_target())
    src = ex.mod.imports[0].inspect_source("")
    assert "__shared__" in src and "__syncthreads()" in src and re.search(load, src), src
    assert_builds_for_sm87(src, tmp_path)


@pytest.mark.parametrize("M,K,O", [(2, 64, 128), (9, 132, 30), (18, 40, 64)])
def test_dp4a_w8a8_for_few_rows_is_exact(M, K, O):
    """The W8A8 kernel for few rows, loops serial and __dp4a written out: the exact integer
    product, scaled as the simulation does (bit-equal). 132 inputs are 33 words, which do not
    divide between the 32 thread rows; 30 columns take single-word loads."""
    from schedules.gpu_bench import inputs
    xq, sx, q, s = inputs(M, K, O)
    (y,) = run(qmatmul.dense_w8a8_dp4a_rows(M, K, O, bound=False), xq, sx, qmatmul.pack_dp4a(q), s,
               out=[((M, O), "float32")])
    exact = (xq.astype(np.int64) @ q.T.astype(np.int64)).astype(np.float32) * sx * s
    np.testing.assert_array_equal(y, exact)


@pytest.mark.parametrize("M,K,TX", [(3, 1000, None), (2, 64, None), (1, 7, 8), (4, 130, 32)])
def test_gpu_per_token_quantization_is_the_simulations(M, K, TX):
    """The GPU kernel, loops serial: int8 values and scales bit-equal to the simulation's, with K
    not a multiple of the block's threads and a value exactly half-way between two steps."""
    x = np.random.default_rng(K).standard_normal((M, K)).astype(np.float32)
    x[0, :2] = (127.0, 2.5)                          # s = 1: the second is half-way, rounds to even (2)
    xq, sx = run(matmul.quantize_per_token_gpu(M, K, bound=False, TX=TX), x,
                 out=[((M, K), "int8"), ((M, 1), "float32")])
    ref_q, ref_s = quantize_per_token_int8(torch.from_numpy(x))
    np.testing.assert_array_equal(xq, ref_q.numpy())
    np.testing.assert_array_equal(sx, ref_s.numpy())


def test_gpu_per_token_quantization_is_one_kernel_with_a_block_per_row():
    import targets
    f = matmul.quantize_per_token_gpu(2, 4096)
    ex = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}),
                     target=targets.load("jetson-orin").tvm_target())
    src = ex.mod.imports[0].inspect_source("")
    assert src.count("__global__") == 2 and "__launch_bounds__(256)" in src and "__syncthreads()" in src  # declared, defined


def test_dp4a_w8a8_for_few_rows_compiles_for_orin_on_dp4a():
    import re

    import targets
    f = qmatmul.dense_w8a8_dp4a_rows(2, 1024, 3072)
    ex = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}),
                     target=targets.load("jetson-orin").tvm_target())
    src = ex.mod.imports[0].inspect_source("")
    assert "__dp4a(" in src and "__shared__" in src and re.search(r"\*\(int4\*\)\(", src)


def test_fast_tanh_is_within_4e_7_of_tanh():
    x = np.concatenate([np.linspace(-12, 12, 48001), [0.0, 3e38, -3e38]]).astype(np.float32)

    @tvm.script.tirx.prim_func(private=True)
    def f(a: tvm.script.tirx.Buffer((x.size,), "float32"), b: tvm.script.tirx.Buffer((x.size,), "float32")):
        for i in range(x.size):
            b[i] = matmul.fast_tanh(a[i])
    (y,) = run(f, x, out=[((x.size,), "float32")])
    np.testing.assert_allclose(y, np.tanh(x.astype(np.float64)), rtol=0, atol=4e-7)


def test_pack_weight_refuses_ragged_panels():
    with pytest.raises(ValueError, match="multiple of 16"):
        matmul.pack_weight(np.zeros((20, 8), np.float32))


def quantized_case(M, K, O, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * 3).astype(np.float32)
    x[0, :4] = [0.5, -0.5, 1.5, 2.5]  # ties: round half to even
    w = rng.standard_normal((O, K)).astype(np.float32)
    w[1] *= 1e-3                       # a channel with tiny scales
    return x, w, rng.standard_normal(O).astype(np.float32)


def run_quantized(scheme, x, packed, b, dot=None):
    """The CPU kernel of `scheme` on x (activations quantized by our kernel when needed);
    `dot`: the W8A8 or W4A8 kernel on that integer dot product."""
    M, K = x.shape
    O = b.shape[0]
    w, ws = qmatmul.pack_cpu(scheme.name, packed["qweight"].numpy(), packed["scales"].numpy(), dot)
    if scheme.name == "w4a16":
        xk, sx = x, np.zeros((1, 1), np.float32)
    else:
        xk, sx = run(matmul.quantize_per_token(M, K), x, out=[((M, K), "int8"), ((M, 1), "float32")])
        ref_q, ref_s = quantize_per_token_int8(torch.from_numpy(x))
        np.testing.assert_array_equal(xk, ref_q.numpy())
        np.testing.assert_array_equal(sx, ref_s.numpy())
    kernel = qmatmul.cpu_kernel(M, K, O, scheme.name, scheme.group, dot)
    (y,) = run(kernel, xk, sx, w, ws, b,
               out=[((M, O), "float32")])
    return y if scheme.name == "w4a16" else y + b  # the bias is the caller's for integer kernels


@pytest.mark.parametrize("scheme", [W8A8(), W4A8(32), W4A8(64)], ids=lambda s: f"{s.name}-{s.group}")
@pytest.mark.parametrize("M,K,O", [(2, 64, 48), (18, 128, 32), (1, 2112, 16)])
def test_integer_kernels_equal_the_pytorch_simulation_bit_for_bit(scheme, M, K, O):
    """2112 inputs: more than one exact float32 run (w8a8 sums 192 at a time)."""
    x, w, b = quantized_case(M, K, O, K + O)
    packed = scheme.pack(torch.from_numpy(w))
    want = (scheme.matmul(torch.from_numpy(x), packed) + torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(run_quantized(scheme, x, packed, b), want)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="vpmaddwd is an x86 instruction")
@pytest.mark.parametrize("scheme", [W8A8(), W4A8(32), W4A8(2)], ids=lambda s: f"{s.name}-{s.group}")
@pytest.mark.parametrize("M,K,O", [(2, 64, 48), (18, 128, 32), (1, 2112, 16), (5, 6, 16)])
def test_pmaddwd_kernels_equal_the_pytorch_simulation_bit_for_bit(scheme, M, K, O):
    if scheme.group and K % scheme.group:
        pytest.skip("the group does not divide K")
    x, w, b = quantized_case(M, K, O, K + O)
    x[-1] = 1.0                        # a row of 127s: the largest sums
    w[0] = -1.0
    packed = scheme.pack(torch.from_numpy(w))
    want = (scheme.matmul(torch.from_numpy(x), packed) + torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(run_quantized(scheme, x, packed, b, dot="pmaddwd"), want)


VNNI_CPUS = ("alderlake", "znver4")    # AVX-VNNI (VEX), AVX512-VNNI on 256-bit vectors (EVEX)


@pytest.mark.parametrize("M,K,O", [(2, 64, 48), (18, 128, 32), (1, 2112, 16), (5, 8, 16)])
def test_vnni_kernel_equals_the_pytorch_simulation_bit_for_bit(M, K, O):
    """W8A8 on vpdpbusd, its sum written out (this CPU has no VNNI): weights stored as w + 128
    and each row's 128·Σx taken off give the simulation's sums, at their extremes too."""
    x, w, b = quantized_case(M, K, O, K + O)
    x[-1] = 1.0                        # a row of 127s
    w[0], w[2] = -1.0, 1.0             # channels of −127 (stored as 1) and of 127 (stored as 255)
    scheme = W8A8()
    packed = scheme.pack(torch.from_numpy(w))
    want = scheme.matmul(torch.from_numpy(x), packed).numpy()
    xq, sx = (a.numpy() for a in quantize_per_token_int8(torch.from_numpy(x)))
    wp, ws = qmatmul.pack_cpu("w8a8", packed["qweight"].numpy(), packed["scales"].numpy(), "vpdpbusd")
    assert wp.view(np.uint8).min() >= 1
    (y,) = run(qmatmul.dense_dot(M, K, O, "vpdpbusd", emulate=True), xq, sx, wp, ws, b, out=[((M, O), "float32")])
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("cpu", VNNI_CPUS)
def test_vnni_builds_run_on_vpdpbusd(cpu):
    """For VNNI CPUs the W8A8 kernel and the benchmark's peak kernel compile to vpdpbusd, with no
    vpmaddwd left; where this CPU has VNNI, the real instruction gives the simulation's result."""
    from schedules.bench import int_peak_kernel
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "mtriple": "x86_64-linux-gnu"})
    for func in (qmatmul.dense_dot(6, 128, 32, "vpdpbusd"), int_peak_kernel(2, 10, dot="vpdpbusd")[0]):
        ex = tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), target=target)
        asm = ex.mod.inspect_source("s")
        assert "vpdpbusd" in asm and "vpmaddwd" not in asm
    import targets
    if targets.load("host").int_dot == "vpdpbusd":
        x, w, b = quantized_case(6, 128, 32, 0)
        packed = W8A8().pack(torch.from_numpy(w))
        xq, sx = (a.numpy() for a in quantize_per_token_int8(torch.from_numpy(x)))
        wp, ws = qmatmul.pack_cpu("w8a8", packed["qweight"].numpy(), packed["scales"].numpy(), "vpdpbusd")
        (y,) = run(qmatmul.dense_dot(6, 128, 32, "vpdpbusd"), xq, sx, wp, ws, b, out=[((6, 32), "float32")])
        np.testing.assert_array_equal(y, W8A8().matmul(torch.from_numpy(x), packed).numpy())


def test_a_w8a8_layer_built_for_a_vnni_cpu_runs_on_vpdpbusd():
    """The whole path of a layer (packing, the Relax call, the build pipeline) picks VNNI from
    the target: a W8A8 Dense compiled for an Alder Lake calls vpdpbusd (compiled, not run)."""
    from tvm.relax.frontend import nn as rnn

    import targets
    from compiler.build import pipeline
    from compiler.compress.quant import QuantLinear
    from compiler.lower.layers import Dense
    board = dataclasses.replace(targets.load("host"), target={"kind": "llvm", "mcpu": "alderlake",
                                                             "mtriple": "x86_64-linux-gnu"})
    torch.manual_seed(0)
    d = Dense(QuantLinear(torch.nn.Linear(64, 32), W8A8()), int_dot=board.int_dot)
    assert d.dot == "vpdpbusd"
    mod, _ = d.export_tvm(spec={"forward": {"x": rnn.spec.Tensor([12, 64], "float32"),
                                            "$": {"param_mode": "plain", "effect_mode": "none"}}})
    t = board.tvm_target()
    ex = tvm.compile(mod, target=t, relax_pipeline=pipeline(t))
    assert "vpdpbusd" in ex.mod.imports[0].inspect_source("s")     # the kernels' library


def test_each_cpu_gets_its_integer_dot_product():
    import targets
    assert targets.load("rpi5").int_dot == "sdot" and targets.load("jetson-orin").cpu_only().int_dot == "sdot"
    assert targets.load("arm64-cpu").int_dot == "sdot"
    if platform.machine() == "x86_64":
        host = targets.load("host")
        vnni = any(tvm.target.codegen.target_has_features(f, host.tvm_target()) for f in ("avxvnni", "avx512vnni"))
        assert host.int_dot == ("vpdpbusd" if vnni else "pmaddwd")
    x86 = lambda cpu: dataclasses.replace(targets.load("host"), target={"kind": "llvm", "mcpu": cpu,  # noqa: E731
                                                                        "mtriple": "x86_64-linux-gnu"})
    assert x86("alderlake").int_dot == "vpdpbusd" and x86("znver4").int_dot == "vpdpbusd"   # AVX-VNNI, AVX512-VNNI
    assert x86("znver2").int_dot == "pmaddwd" and x86("x86-64").int_dot is None              # AVX2 only, SSE only
    assert "avx_vnni" in x86("alderlake").cpu_flags and "avx512_vnni" in x86("znver4").cpu_flags
    assert x86("x86-64").cpu_flags == [] and "asimddp" in targets.load("rpi5").cpu_flags
    assert qmatmul.dot_for("vpdpbusd", 64) == "vpdpbusd" and qmatmul.dot_for("vpdpbusd", 6) is None
    assert qmatmul.dot_for("vpdpbusd", 64, 32) == "pmaddwd"     # int4 weights take pmaddwd on VNNI CPUs
    assert qmatmul.dot_for("sdot", 1024) == "sdot" and qmatmul.dot_for("pmaddwd", 7) is None  # odd K: float kernel
    assert qmatmul.dot_for("sdot", 6) is None and qmatmul.dot_for(None, 1024) is None
    assert qmatmul.dot_for("sdot", 64, 2) is None and qmatmul.dot_for("pmaddwd", 64, 2) == "pmaddwd"  # int4 groups
    with pytest.raises(UserError, match="group size 2 is not a multiple of sdot's 4"):
        qmatmul.dense_dot(4, 64, 16, "sdot", 2)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("M,K,O", [(3, 128, 32), (7, 256, 16)])
def test_w4a16_kernel_matches_the_dequantized_product(group, M, K, O):
    x, w, b = quantized_case(M, K, O, M)
    scheme = W4A16(group)
    packed = scheme.pack(torch.from_numpy(w))
    want = (scheme.matmul(torch.from_numpy(x), packed) + torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(run_quantized(scheme, x, packed, b), want, rtol=1e-5, atol=1e-4)


def test_int4_nibbles_cover_the_whole_grid():
    """Every value of [-8, 7] in both nibbles survives pack → kernel unpack, in the float kernel
    and (x86) in the integer dot kernel's operand words."""
    q = np.array([[a, c] for a in range(-8, 8) for c in range(-8, 8)], np.int8).reshape(1, -1)
    q = np.repeat(q, 16, 0)                              # 16 channels × 512 inputs
    packed = {"qweight": pack_int4(torch.from_numpy(q)), "scales": torch.ones(16, 16, dtype=torch.float16)}
    x = np.eye(512, dtype=np.float32)                   # y[i, o] = w[o, i]
    y = run_quantized(W4A16(32), x, packed, np.zeros(16, np.float32))
    np.testing.assert_array_equal(y.T, q.astype(np.float32))
    if platform.machine() == "x86_64":
        y = run_quantized(W4A8(32), 127 * x, packed, np.zeros(16, np.float32), dot="pmaddwd")  # scales 1
        np.testing.assert_array_equal(y.T, 127 * q.astype(np.float32))


@pytest.mark.parametrize("K,group", [(96, 64), (64, 0), (64, 7)])
def test_groups_that_do_not_divide_the_inputs_are_refused(K, group):
    with pytest.raises(UserError, match=f"group size {group}"):
        qmatmul.dense_quant(4, K, 16, "w4a8", group)


def reference_attention(q, kv, win, pns, qs, share):
    """q: NB batch rows, or for ASC "cond" the conditional half's (the kernel's query_rows)."""
    NB, H = kv.shape[1], q.shape[1]
    end = sum(p * p for p in pns[:qs + 1])
    out = np.zeros_like(q)
    for h in range(H):
        windows = [None if w < 0 else int(w) for w in win[qs, h, :qs + 1]]
        mask = scale_mask(windows, pns, qs).numpy()
        src = range(NB // 2) if share else range(NB)
        for b in src:
            s = np.where(mask, q[b, h] @ kv[0, b, h, :end].T, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, h] = p @ kv[1, b, h, :end]
            if share == "map":
                out[b + NB // 2, h] = p @ kv[1, b + NB // 2, h, :end]
            elif share == "output":
                out[b + NB // 2, h] = out[b, h]
    return out


def attention_problem(pns, qs, c, H=3, NB=4, share=None):
    """Random q and keys/values, and windows for query scale qs: bands (the widest at the edges
    of the scale), dropped key scales, a window wider than its scale (dense) and dense heads.
    ASC "cond": q of the conditional half only."""
    S = len(pns)
    n = pns[qs] ** 2
    rng = np.random.default_rng(c + qs)
    q = rng.standard_normal((NB, H, n, c)).astype(np.float32)
    kv = rng.standard_normal((2, NB, H, sum(p * p for p in pns), c)).astype(np.float32)
    win = -np.ones((S, H, S), np.int32)
    win[qs, 0, :qs + 1] = [-1, 1, 2, 1, 3, 2, 1][:qs + 1]
    win[qs, 1, :qs + 1] = [0, -1, 1, 0, 2, 0, 1][:qs + 1]
    win[qs, 2, :qs + 1] = [-1, -1, -1, 16, -1, 64, 99][:qs + 1]
    return q[:attention.query_rows(NB, share)], kv, win


KERNELS = {   # name → the kernel's maker; the GPU variants' thread loops run here as plain loops
    "cpu": attention.windowed_attention,
    "gpu-rows": partial(attention._attention_rows, bound=False),
    "gpu-rows-scalar": partial(attention._attention_rows, bound=False, vector=False),
    "cuda-tiled": partial(attention._attention_tiled, bound=False),
    "cuda-tiled-8x8x2": partial(attention._attention_tiled, bound=False, QT=8, KT=8, TPR=2),
    "cuda-tiled-scalar": partial(attention._attention_tiled, bound=False, vector_keys=False, vector_values=False),
}


@pytest.mark.parametrize("share", [None, "map", "output", "cond"])
@pytest.mark.parametrize("c", [8, 6])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("qs", [2, 3])
def test_windowed_attention_keeps_exactly_the_plan_pairs(share, c, kernel, qs):
    """Scale 2 has 9 queries, not a whole number of the CPU kernel's 8-row blocks; the 8×8 tiles
    split scale 3's rows and keys into several tiles."""
    pns = [1, 2, 3, 4]
    S, H, NB = 4, 3, 4
    L, n = kv_layout.cache_len(pns), pns[qs] ** 2
    q, kv, win = attention_problem(pns, qs, c, H, NB, share)
    func = KERNELS[kernel](NB, H, n, c, L, S, qs, share)
    (out,) = run(func, q, kv_layout.cache_of(kv, pns), win, kv_layout.scale_slots(pns), out=[(q.shape, "float32")])
    np.testing.assert_allclose(out, reference_attention(q, kv, win, pns, qs, share), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [None, "map"])
@pytest.mark.parametrize("c", [12, 32])
def test_tiled_cuda_attention_over_several_row_and_key_tiles(share, c):
    """64 queries (four 16-row tiles) against key scales of up to 64 keys (four 16-key tiles),
    with the CUDA kernel's own tile sizes; 12 channels go one float at a time (3 per thread),
    32 in 4-float groups (2 per thread)."""
    pns = [1, 2, 4, 6, 8]
    S, H, NB, qs = 5, 3, 2, 4
    L, n = kv_layout.cache_len(pns), pns[qs] ** 2
    q, kv, win = attention_problem(pns, qs, c, H, NB)
    func = KERNELS["cuda-tiled"](NB, H, n, c, L, S, qs, share)
    (out,) = run(func, q, kv_layout.cache_of(kv, pns), win, kv_layout.scale_slots(pns), out=[((NB, H, n, c), "float32")])
    np.testing.assert_allclose(out, reference_attention(q, kv, win, pns, qs, share), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [None, "output", "map", "cond"])
def test_tiled_cuda_attention_compiles_for_orin_with_shared_tiles_and_16_byte_loads(share, tmp_path):
    """d16's last scale for sm_87: keys and values come from shared memory in float4 loads
    (single floats for ASC "map", which was faster so on the H100), and the block's shared
    memory fits the 48 KB a kernel gets without opting in."""
    import re

    import targets
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    f = attention.windowed_attention(2, 16, 256, 64, kv_layout.cache_len(pns), 10, 9, share, gpu="cuda")
    ex = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}),
                     target=targets.load("jetson-orin").tvm_target())
    src = ex.mod.imports[0].inspect_source("")
    assert "__shared__" in src and "__syncthreads()" in src
    vector_loads = [re.search(rf"\*\(float4\*\)\({b}_sh_ptr \+", src) is not None for b in ("k", "v")]
    assert vector_loads == [share != "map"] * 2
    assert_builds_for_sm87(src, tmp_path)


def simulated_8bit_attention(q, kv, win, pns, qs, share):
    """The PyTorch simulation of a plan's 8-bit attention (CompressedAttention, attn_bits=8)."""
    from compiler.compress.attention import CompressedAttention
    H, end = q.shape[1], sum(p * p for p in pns[:qs + 1])
    windows = [[[None if w < 0 else int(w) for w in win[s, h, :s + 1]] for s in range(len(pns))] for h in range(H)]
    if share == "cond":     # the conditional half of ASC "output"
        return simulated_8bit_attention(np.concatenate([q, q]), kv, win, pns, qs, "output")[:len(q)]
    sim = CompressedAttention(pns, windows, [share is not None] * len(pns) if share else None, share or "map", 8)
    k, v = (torch.from_numpy(kv[i][:, :, :end]) for i in (0, 1))
    return sim(torch.from_numpy(q), k, v).numpy()


def on_8bit_grid(x):
    from compiler.compress.quant import fake_quant_per_token
    return fake_quant_per_token(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("share", [None, "map", "output", "cond"])
@pytest.mark.parametrize("c", [8, 6])
@pytest.mark.parametrize("kernel", ["cpu", "rows", "rows-parallel"])
def test_8bit_attention_matches_the_simulation(share, c, kernel):
    """q, k and v on their per-token grids (the graph puts them there), the weights rounded to
    each row's unsigned 8-bit grid in the kernel: the simulation's arithmetic, bands, dropped
    scales and ASC included."""
    pns, qs = [1, 2, 3, 4], 3
    S, H, NB = 4, 3, 4
    L, n = kv_layout.cache_len(pns), pns[qs] ** 2
    q, kv, win = attention_problem(pns, qs, c, H, NB, share)
    if kernel == "cpu":
        func = attention.windowed_attention(NB, H, n, c, L, S, qs, share, map_bits=8)
    else:   # the per-row kernel's loops serial, or its rows as parallel CPU tasks
        bound = "cpu" if kernel == "rows-parallel" else False
        func = attention._attention_rows(NB, H, n, c, L, S, qs, share, bound=bound, map_bits=8)
    (out,) = run(func, on_8bit_grid(q), kv_layout.cache_of(on_8bit_grid(kv), pns), win, kv_layout.scale_slots(pns),
                 out=[(q.shape, "float32")])
    want = simulated_8bit_attention(q, kv, win, pns, qs, share)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # the rounding is real: the unrounded weights give another output
    assert np.abs(want - reference_attention(q, kv, win, pns, qs, share)).max() > 1e-3


def opencl_device():
    try:
        from schedules.gpu_bench import opencl_queue
        return opencl_queue()
    except UserError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("share", [None, "map", "output", "cond"])
@pytest.mark.parametrize("c,vector,bits", [(8, True, None), (6, True, None), (8, False, None), (8, True, 8)])
def test_opencl_attention_runs_on_an_opencl_device_like_the_reference(share, c, vector, bits):
    """The generated OpenCL itself, launched by pyopencl (PoCL here and in CI): 16 query rows of
    scale 3 are a partial 64-thread block; c = 6 takes single-float value loads; bits = 8 is the
    8-bit attention against the simulation."""
    import re

    import pyopencl as cl

    import targets
    from schedules.gpu_bench import opencl_attention, opencl_launcher
    queue = opencl_device()
    pns, qs = [1, 2, 3, 4], 3
    S, H, NB = 4, 3, 4
    L, n = kv_layout.cache_len(pns), pns[qs] ** 2
    q, kv, win = attention_problem(pns, qs, c, H, NB, share)
    spec = opencl_attention(targets.load("mali-g610"), NB, H, n, c, L, S, qs, share, vector, bits)
    assert ("vload4(0, kvf_ptr" in spec["source"]) == vector
    assert not re.search(r"\blong\b", spec["source"]), "64-bit index arithmetic in the kernel"
    grid = on_8bit_grid if bits else (lambda x: x)
    launch, bufs = opencl_launcher(queue, spec, spec["source"],
                                   {"q": grid(q), "kv": kv_layout.cache_of(grid(kv), pns), "win": win,
                                    "geom": kv_layout.scale_slots(pns), "out": np.zeros_like(q)})
    launch().wait()
    out = np.empty_like(q)
    cl.enqueue_copy(queue, out, bufs["out"]).wait()
    want = (simulated_8bit_attention if bits else reference_attention)(q, kv, win, pns, qs, share)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 1])
def test_kv_write_fills_only_its_scale(rows):
    """rows = 1: ASC "cond" writes the conditional half's keys only, into the cache of both."""
    NB, H, n, c, L, begin = 2, 2, 4, 8, 14, 5
    before = np.full((2, NB, H, L, c), 7.0, np.float32)
    k = np.random.default_rng(0).standard_normal((rows, H, n, c)).astype(np.float32)
    f = attention.kv_write(rows, H, n, c, L, begin, cache_nb=NB).with_attr("global_symbol", "f")
    ex = tvm.compile(tvm.IRModule({"f": f}), target=TARGET)
    kv_t = tvm.runtime.tensor(kv_layout.cache_of(before), DEV)
    ex["f"](kv_t, tvm.runtime.tensor(k, DEV), tvm.runtime.tensor(-k, DEV))
    want = before.copy()
    want[0, :rows, :, begin:begin + n], want[1, :rows, :, begin:begin + n] = k, -k
    np.testing.assert_array_equal(kv_t.numpy(), kv_layout.cache_of(want))


def test_fast_exp_is_as_accurate_as_float32_exp():
    x = np.concatenate([-np.geomspace(1e-8, 86, 20000), [0.0, -87.0, -100.0, -3e38]]).astype(np.float32)

    @tvm.script.tirx.prim_func(private=True)
    def f(a: tvm.script.tirx.Buffer((x.size,), "float32"), b: tvm.script.tirx.Buffer((x.size,), "float32")):
        for i in range(x.size):
            b[i] = attention.fast_exp(a[i])
    (y,) = run(f, x, out=[((x.size,), "float32")])
    want = np.exp(x.astype(np.float64))
    ok = x >= -87
    np.testing.assert_allclose(y[ok], want[ok], rtol=4e-7)
    assert (y[~ok] < 2e-38).all() and (y >= 0).all()


@pytest.mark.parametrize("B,Ci,H,W,Co,k", [(1, 5, 16, 16, 8, 3), (2, 3, 6, 10, 7, 3), (1, 4, 8, 8, 12, 1),
                                          (1, 3, 4, 24, 10, 3), (1, 2, 5, 5, 18, 3), (2, 21, 4, 32, 10, 1),
                                          (1, 3, 3, 5, 4, 1)])
def test_conv2d_matches_pytorch(B, Ci, H, W, Co, k):
    """3×3 and 1×1, the latter also on pixel blocks (of 16, 8 and 1 lanes, two blocks per row,
    two images)."""
    from schedules.conv import conv2d, pack_weight
    rng = np.random.default_rng(Ci)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((B, Ci, H, W), (Co, Ci, k, k), (Co,)))
    want = torch.nn.functional.conv2d(*map(torch.from_numpy, (x, w, b)), padding=k // 2).numpy()
    (y,) = run(conv2d(B, Ci, H, W, Co, k), x, pack_weight(w), b, out=[((B, Co, H, W), "float32")])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
    if k == 1:
        (y,) = run(conv2d(B, Ci, H, W, Co, k, pixel_blocks=True), x, pack_weight(w), b, out=[((B, Co, H, W), "float32")])
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,Ci,H,W,Co", [(1, 5, 16, 16, 8), (2, 3, 8, 12, 7), (1, 4, 4, 4, 10),
                                         (1, 16, 32, 32, 15), (1, 3, 8, 64, 6), (1, 3, 64, 64, 10),
                                         (2, 5, 32, 64, 7)])
def test_winograd_conv2d_matches_pytorch(B, Ci, H, W, Co):
    """Tiles gathered across tile rows (16², 8×12, one tile), within one row (8×64), one and two
    images, channel counts that fill no vector; in bands and one task per tile vector (64², and
    two images of 32×64)."""
    from schedules import winograd
    from schedules.conv import pack_weight
    assert winograd.fused(B, Ci, H, W) == (H * W * B >= 4096)
    rng = np.random.default_rng(Ci + W)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((B, Ci, H, W), (Co, Ci, 3, 3), (Co,)))
    (y,) = run(winograd.conv2d(B, Ci, H, W, Co), x, pack_weight(w), b, out=[((B, Co, H, W), "float32")])
    want = torch.nn.functional.conv2d(*map(torch.from_numpy, (x, w, b)), padding=1).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("band_bytes", [None, 1])
def test_winograd_own_filters_layout_matches_pytorch(monkeypatch, band_bytes):
    """Many channels (U past OWN_FILTERS_U_BYTES): each product tile's task transforms its own
    filters, with a product tile past Co, two images and, with band_bytes=1, one tile vector
    per band (filters transformed again for each)."""
    from schedules import winograd
    from schedules.conv import pack_weight
    B, Ci, H, W, Co = 2, 121, 16, 32, 125
    assert winograd.layout_for(B, Ci, H, W, Co) == "own_filters"
    if band_bytes:
        monkeypatch.setattr(winograd, "OWN_FILTERS_BAND_BYTES", band_bytes)
    winograd.conv2d.cache_clear()
    rng = np.random.default_rng(5)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((B, Ci, H, W), (Co, Ci, 3, 3), (Co,)))
    (y,) = run(winograd.conv2d(B, Ci, H, W, Co), x, pack_weight(w), b, out=[((B, Co, H, W), "float32")])
    winograd.conv2d.cache_clear()
    want = torch.nn.functional.conv2d(*map(torch.from_numpy, (x, w, b)), padding=1).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-4 * np.abs(want).max())


def test_winograd_applies_only_where_it_pays():
    from schedules import winograd
    assert winograd.applies(160, 3, 1, 1, 256, 256) and winograd.applies(320, 3, 1, 1, 32, 32)
    assert winograd.applies(640, 3, 1, 1, 16, 16)
    assert not winograd.applies(640, 3, 1, 1, 8, 8)        # filter transform per call outweighs it
    assert not winograd.applies(3, 3, 1, 1, 256, 256)      # too few output channels
    assert not winograd.applies(64, 1, 1, 0, 64, 64) and not winograd.applies(64, 3, 2, 1, 64, 64)
    assert not winograd.applies(64, 3, 1, 1, 34, 34)       # no whole 4×4 tiles


@pytest.mark.parametrize("scheme", [None, W8A8()], ids=["fp32", "w8a8"])
def test_dense_layer_pads_rows_without_a_good_tile(scheme):
    """98 tokens (2·7²) run as 102 rows (tiles of 6) in fp32 and w8a8; the padding never reaches
    the output."""
    from tvm.relax.frontend import nn as rnn

    import targets
    from compiler.build import pipeline
    from compiler.compress.quant import QuantLinear
    from compiler.lower.layers import Dense, padded_rows
    M, K, O = 98, 64, 32
    assert padded_rows(M) == 102 and padded_rows(50) == 50
    assert all(matmul.row_tile(padded_rows(m)) == 6 for m in range(64, 2000))
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, O)
    layer = lin if scheme is None else QuantLinear(lin, scheme)
    board = targets.load("host")
    d = Dense(layer, int_dot=board.int_dot)
    mod, named = d.export_tvm(spec={"forward": {"x": rnn.spec.Tensor([M, K], "float32"),
                                                "$": {"param_mode": "plain", "effect_mode": "none"}}})
    t = board.tvm_target()
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=t, relax_pipeline=pipeline(t)), tvm.cpu())
    x = torch.randn(M, K) * 3
    y = vm["forward"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(p.np_value) for _, p in named]).numpy()
    want = layer(x).detach().numpy()
    if scheme is None:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("B,C,H,W,G", [(1, 64, 16, 16, 32), (2, 12, 5, 8, 4), (1, 6, 3, 8, 3)])
@pytest.mark.parametrize("with_silu", [False, True])
def test_group_norm_matches_pytorch(B, C, H, W, G, with_silu):
    from schedules.groupnorm import group_norm
    rng = np.random.default_rng(C + H)
    x = (rng.standard_normal((B, C, H, W)) * 4 + 1).astype(np.float32)
    x[0, 0, 0, :4] = [-60.0, 60.0, 0.0, -0.0]          # SiLU's far tails and zero
    g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    (y,) = run(group_norm(B, C, H, W, G, 1e-6, with_silu), x, g, b, out=[((B, C, H, W), "float32")])
    want = torch.nn.functional.group_norm(*map(torch.from_numpy, (x, )), G, torch.from_numpy(g), torch.from_numpy(b), 1e-6)
    if with_silu:
        want = torch.nn.functional.silu(want)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("NB,n,C", [(2, 1, 40), (4, 9, 64), (2, 36, 1024)])
def test_layer_norm_modulate_matches_pytorch(NB, n, C):
    """VAR's AdaLN LayerNorm: one token (serial rows), a channel count that leaves a partial
    accumulator step (40 = 32 + 8), and enough rows for parallel tasks; an offset mean and a
    large spread, where a one-pass variance would lose digits."""
    from schedules.groupnorm import layer_norm_modulate
    rng = np.random.default_rng(C + n)
    x = (rng.standard_normal((NB, n, C)) * 8 + 50).astype(np.float32)
    scale, shift = (rng.standard_normal((NB, 1, C)).astype(np.float32) for _ in range(2))
    (y,) = run(layer_norm_modulate(NB, n, C, 1e-6), x, scale, shift, out=[((NB, n, C), "float32")])
    t = torch.from_numpy
    want = torch.nn.functional.layer_norm(t(x), (C,), eps=1e-6) * (1 + t(scale)) + t(shift)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("share", [None, "map", "output", "cond"])
@pytest.mark.parametrize("bits", [None, 8])
def test_cpu_attention_over_several_row_blocks_and_value_passes(share, bits):
    """The CPU kernel on 36 queries (four whole 8-row blocks, whose q tiles are transposed in
    registers, and a last block of 4 rows) and 32 channels (two 16-channel p·V passes), with
    bands, dropped key scales and dense key scales in one list of keys."""
    pns, qs, c = [1, 2, 3, 4, 5, 6], 5, 32
    S, H, NB = 6, 3, 4
    L, n = kv_layout.cache_len(pns), pns[qs] ** 2
    q, kv, win = attention_problem(pns, qs, c, H, NB, share)
    grid = on_8bit_grid if bits else (lambda x: x)
    func = attention.windowed_attention(NB, H, n, c, L, S, qs, share, map_bits=bits)
    (out,) = run(func, grid(q), kv_layout.cache_of(grid(kv), pns), win, kv_layout.scale_slots(pns),
                 out=[(q.shape, "float32")])
    want = (simulated_8bit_attention if bits else reference_attention)(q, kv, win, pns, qs, share)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["winograd_w_end", "winograd_x_start", "winograd_x_end", "conv_x_start",
                                  "conv_x_end", "sampling_logits_end"])
def test_kernels_read_nothing_past_their_inputs(case):
    """Each input placed against an unreadable page (tests/guard_pages.py, in a process of its
    own): a read past the end or before the start faults. The Winograd filter transform and the
    sampler's last partial vector did read past w and the logits (a Select's clamp dropped by
    TVM's simplifier); a d16 plan build crashed in its decoder when w ended at a page."""
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("guard_pages.py")), case],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
