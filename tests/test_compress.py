"""LiteVAR compression pieces on their own: windows, sparse attention, quantization, plan file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compiler.compress.apply import apply_plan, attention_macs, weight_bytes
from compiler.compress.attention import CompressedAttention
from compiler.compress.mdwa import band_mask, band_range, choose_windows, scale_mask, window_statistics
from compiler.compress.plan import Plan, load_plan, parse_plan
from compiler.compress.quant import (W4A8, W4A16, W8A8, pack_int4, quantize_per_token_int8, quantize_weight_int4,
                                     quantize_weight_int8, unpack_int4)
from compiler.errors import UserError
from compiler.model.var import sdpa
from compiler.sampler import generate
from tests.conftest import TINY_VAR, tiny_models

PN = (1, 2, 3, 4)


def test_band_range_matches_band_mask():
    for n_q, n_k in [(16, 16), (16, 9), (256, 169), (9, 1), (4, 4), (169, 16)]:
        for w in (1, 2, 3, 5, 17):
            lo, hi = band_range(n_q, n_k, w)
            m = band_mask(n_q, n_k, w)
            j = torch.arange(n_k)[None, :]
            assert torch.equal(m, (j >= lo[:, None]) & (j <= hi[:, None])), (n_q, n_k, w)
            assert m.sum(1).min() >= 1  # every query keeps its centre


def test_windows_from_a_hand_made_attention_map():
    """Query scale 3 (4×4): all of key scale 3's mass within |i−j| < 2, key scale 2's on its
    centre column, key scale 1 a negligible uniform share."""
    n_q = 16
    P = torch.zeros(1, 1, n_q, 1 + 4 + 9 + 16)
    for i in range(n_q):
        P[0, 0, i, 0] = 0.1
        P[0, 0, i, 1:5] = 0.001 / 4
        P[0, 0, i, 5 + round(i * 9 / 16)] = 0.2 - 0.001
        near = [j for j in range(16) if abs(i - j) < 2]
        for j in near:
            P[0, 0, i, 14 + j] = 0.7 / len(near)
    block, window = window_statistics(P, PN, 3)
    bm = np.zeros((1, 1, 4, 4))
    wm = np.zeros((1, 1, 4, 4, window.shape[-1]))
    bm[0, :, 3] = block / n_q
    wm[0, :, 3] = window / n_q
    w = choose_windows(bm, wm, PN, threshold=0.95, dense_scales=3)
    assert w[0][0][3] == [None, None, 1, 2]  # scales 0–1 always kept for query scale 3
    assert w[0][0][:3] == [[None], [None, None], [None, None, None]]  # first scales dense
    w = choose_windows(bm, wm, PN, threshold=0.95, dense_scales=0, drop_share=0.01, keep_coarse=False)
    assert w[0][0][3] == [None, 0, 1, 2]  # key scale 0 is one token: any window keeps it all


def _rand_qkv(B=2, H=2, q=3, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(p * p for p in PN[:q + 1])
    n = PN[q] ** 2
    return (torch.randn(B, H, n, c, generator=g), torch.randn(B, H, L, c, generator=g),
            torch.randn(B, H, L, c, generator=g))


@pytest.mark.parametrize("windows_q", [[None, 1, 2, 1], [0, None, 1, 3], [1, 1, 1, 1], [None, 0, 0, 2]])
def test_sparse_attention_equals_dense_attention_with_minus_inf_mask(windows_q):
    q, k, v = _rand_qkv()
    windows = [[[None] * (s + 1) for s in range(3)] + [wq] for wq in (windows_q, [None, None, 1, 1])]
    att = CompressedAttention(PN, windows)
    out = att(q, k, v)
    for h, wq in enumerate((windows_q, [None, None, 1, 1])):
        mask = torch.where(scale_mask(wq, PN, 3), 0.0, -torch.inf)
        ref = sdpa(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], mask)
        torch.testing.assert_close(out[:, h:h + 1], ref, atol=1e-5, rtol=1e-5)
    # and masking is real: not the same as dense
    assert not torch.allclose(out, sdpa(q, k, v), atol=1e-3)


def test_asc_variants():
    q, k, v = _rand_qkv(B=4)
    share = [False, False, False, True]
    out = CompressedAttention(PN, None, share, mode="output")(q, k, v)
    torch.testing.assert_close(out[2:], out[:2])
    torch.testing.assert_close(out[:2], sdpa(q[:2], k[:2], v[:2]), atol=1e-5, rtol=1e-5)
    out = CompressedAttention(PN, None, share, mode="map")(q, k, v)
    P = (q[:2] @ k[:2].transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(out[2:], P @ v[2:], atol=1e-5, rtol=1e-5)
    # a scale that is not shared is plain attention
    q2, k2, v2 = _rand_qkv(B=4, q=2)
    torch.testing.assert_close(CompressedAttention(PN, None, share)(q2, k2, v2), sdpa(q2, k2, v2))


def test_int4_pack_unpack_is_lossless_on_the_grid():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)
    q = q[:, torch.randperm(q.shape[1])]
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 32)
    assert torch.equal(unpack_int4(p), q)


def test_weight_quantization_is_lossless_on_its_own_grid():
    g = torch.Generator().manual_seed(0)
    q8 = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    q8[:, 0] = 127  # the channel maximum sets the scale
    s = torch.rand(8, generator=g) + 0.5
    qq, ss = quantize_weight_int8(q8.float() * s[:, None])
    assert torch.equal(qq, q8)
    torch.testing.assert_close(ss, s)
    q4 = torch.randint(-7, 8, (8, 64), generator=g, dtype=torch.int8)
    q4[:, ::32] = 7
    s4 = (torch.rand(8, 2, generator=g) + 0.5).half()
    w = (q4.float().view(8, 2, 32) * s4.float()[..., None]).view(8, 64)
    qq, ss = quantize_weight_int4(w, 32)
    assert torch.equal(qq, q4)
    with pytest.raises(UserError, match="group size 48"):
        quantize_weight_int4(w, 48)


def test_fp16_scheme_rounds_the_weights_only():
    from compiler.compress.quant import QuantLinear, make_scheme
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    q = QuantLinear(lin, make_scheme("fp16"))
    assert q.weight.dtype == torch.float16
    x = torch.randn(5, 40)
    want = x @ lin.weight.detach().half().float().T + lin.bias.detach()
    torch.testing.assert_close(q(x), want, rtol=0, atol=0)
    assert (q(x) - lin(x)).abs().max() > 0
    assert make_scheme("fp16").weight_bytes(24, 40) == 2 * 24 * 40


def test_w8a8_is_integer_arithmetic():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 96, generator=g), torch.randn(7, 96, generator=g)
    sch = W8A8()
    packed = sch.pack(w)
    xq, sx = quantize_per_token_int8(x)
    acc = xq.long() @ packed["qweight"].long().T  # exact int64
    expected = acc.to(torch.int32).float() * sx * packed["scales"]
    assert torch.equal(sch.matmul(x, packed), expected)
    ref = x @ w.T
    assert (sch.matmul(x, packed) - ref).abs().max() < 0.03 * ref.abs().max()
    for S in (W4A16(32), W4A8(32)):
        assert (S.matmul(x, S.pack(w)) - ref).abs().max() < 0.15 * ref.abs().max()


def _plan_json(cfg=TINY_VAR):
    var, vae = tiny_models()
    plan = Plan.empty(var.cfg)
    plan.windows = [[[[None] * (q + 1) for q in range(4)] for _ in range(cfg.heads)] for _ in range(cfg.depth)]
    plan.windows[1][0][3] = [None, None, 1, 2]
    plan.asc_share = [[False, False, True, True] for _ in range(cfg.depth)]
    plan.quant_layers = {"blocks.0.ffn.fc1": {"scheme": "w4a16", "group": 32}}
    return var, vae, plan


def test_plan_round_trip(tmp_path):
    var, vae, plan = _plan_json()
    plan.save(tmp_path / "plan.json")
    back = load_plan(tmp_path / "plan.json", var.cfg)
    assert back.windows == plan.windows and back.asc_share == plan.asc_share
    assert back.quant_layers == plan.quant_layers


@pytest.mark.parametrize("edit, where", [
    (lambda p: p["mdwa"]["windows"][1][0][3].__setitem__(2, -1), "mdwa.windows[1][0][3][2]"),
    (lambda p: p["mdwa"]["windows"][0][1].pop(), "mdwa.windows[0][1]"),
    (lambda p: p["mdwa"]["windows"][0][0][2].__setitem__(2, 0), "mdwa.windows[0][0][2][2]"),
    (lambda p: p["asc"]["share"][1].__setitem__(0, "yes"), "asc.share[1][0]"),
    (lambda p: p["asc"].__setitem__("mode", "both"), "asc.mode"),
    (lambda p: p["quant"]["layers"].__setitem__("blocks.0.ffn.fc1", {"scheme": "w4a16", "group": 48}),
     "quant.layers.blocks.0.ffn.fc1.group"),
    (lambda p: p["quant"]["layers"].__setitem__("blocks.9.ffn.fc1", {"scheme": "w8a8"}), "quant.layers.blocks.9.ffn.fc1"),
    (lambda p: p.__setitem__("version", 7), "version"),
])
def test_a_bad_plan_entry_is_named(edit, where):
    var, _, plan = _plan_json()
    raw = json.loads(json.dumps(plan.to_json()))
    edit(raw)
    with pytest.raises(UserError) as e:
        parse_plan(raw, "plan.json", var.cfg)
    assert f"plan.json: {where}:" in str(e.value)


def test_a_plan_for_another_depth_is_refused():
    var, _, plan = _plan_json()
    raw = plan.to_json()
    raw["model"]["depth"] = 16
    with pytest.raises(UserError, match="made for depth = 16, this model has 2"):
        parse_plan(raw, "plan.json", var.cfg)


def test_plan_changes_generation_only_where_it_says():
    var, vae, plan = _plan_json()
    dense = Plan.empty(var.cfg)
    ref = generate(var, vae, [1, 2], cfg=4, top_k=1, top_p=0)
    same = generate(apply_plan(var, dense), vae, [1, 2], cfg=4, top_k=1, top_p=0)
    assert torch.equal(ref[0], same[0]) and torch.equal(ref[1], same[1])
    comp = apply_plan(var, plan)
    assert type(comp.blocks[0].ffn.fc1).__name__ == "QuantLinear"
    assert comp.blocks[0].ffn.fc1.qweight.dtype == torch.uint8
    out = generate(comp, vae, [1, 2], cfg=4, top_k=1, top_p=0)
    assert out[0].shape == ref[0].shape and torch.isfinite(out[1]).all()
    assert var.blocks[0].ffn.fc1.__class__.__name__ == "Linear"  # the reference is untouched


def test_costs():
    var, _, plan = _plan_json()
    dense, planned = attention_macs(var.cfg, Plan.empty(var.cfg))
    assert dense == planned
    _, planned = attention_macs(var.cfg, plan)
    assert planned < dense
    full = Plan.empty(var.cfg)
    full.asc_share, full.asc_mode = [[True] * 4 for _ in range(2)], "output"
    assert attention_macs(var.cfg, full)[1] * 2 == dense
    fp16, q = weight_bytes(var, plan)
    O, K = 256, 64
    assert fp16 - q == pytest.approx(2 * O * K - (O * K / 2 + 2 * O * 2))  # int4 + fp16 group scales


def test_8bit_attention():
    q, k, v = _rand_qkv(B=4)
    out = CompressedAttention(PN, attn_bits=8)(q, k, v)
    ref = sdpa(q, k, v)
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.03 * ref.abs().max()
    from compiler.compress.quant import fake_quant_per_token
    qq, kq, vq = (fake_quant_per_token(t) for t in (q, k, v))
    P = (qq @ kq.transpose(-1, -2)).softmax(-1)
    s = P.amax(-1, keepdim=True) / 255
    P = torch.round(P / s) * s
    torch.testing.assert_close(out, P @ vq, atol=1e-5, rtol=1e-5)
    # a plan carries it; a bad value is named
    var, _, plan = _plan_json()
    raw = plan.to_json()
    raw["quant"]["attention_bits"] = 4
    with pytest.raises(UserError, match="quant.attention_bits"):
        parse_plan(raw, "plan.json", var.cfg)
    raw["quant"]["attention_bits"] = 8
    assert parse_plan(raw, "plan.json", var.cfg).attention_bits == 8
