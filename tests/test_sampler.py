"""The reference sampler: deterministic, batch-independent under greedy, and its cached
per-scale path agrees with the teacher-forced full-sequence forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.model.config import VARConfig
from compiler.model.var import KVCache
from compiler.sampler import cached_logits, generate, sample_top_k_top_p, teacher_forced_logits
from tests.conftest import TINY_VAR, tiny_models


def test_greedy_is_deterministic():
    var, vae = tiny_models()
    t1, i1 = generate(var, vae, [1, 3], cfg=4, top_k=1, top_p=0.0, seed=0)
    t2, i2 = generate(var, vae, [1, 3], cfg=4, top_k=1, top_p=0.0, seed=123)
    assert torch.equal(t1, t2) and torch.equal(i1, i2)
    assert t1.shape == (2, TINY_VAR.seq_len) and i1.shape == (2, 3, 8, 8)
    assert 0 <= i1.min() and i1.max() <= 1


def test_sampling_is_seeded():
    var, vae = tiny_models()
    a = generate(var, vae, [0, 2], cfg=1.5, top_k=50, top_p=0.9, seed=7)[0]
    b = generate(var, vae, [0, 2], cfg=1.5, top_k=50, top_p=0.9, seed=7)[0]
    c = generate(var, vae, [0, 2], cfg=1.5, top_k=50, top_p=0.9, seed=8)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_of_two_equals_two_single_runs():
    var, vae = tiny_models()
    tb, ib = generate(var, vae, [1, 4], cfg=4, top_k=1, top_p=0.0)
    t0, i0 = generate(var, vae, [1], cfg=4, top_k=1, top_p=0.0)
    t1, i1 = generate(var, vae, [4], cfg=4, top_k=1, top_p=0.0)
    assert torch.equal(tb, torch.cat([t0, t1]))
    torch.testing.assert_close(ib, torch.cat([i0, i1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [TINY_VAR, VARConfig(**{**TINY_VAR.to_dict(), "shared_aln": True})])
def test_teacher_forced_logits_equal_cached_per_scale_logits(cfg):
    var, vae = tiny_models(var_cfg=cfg) if not cfg.shared_aln else _shared_tiny(cfg)
    tokens, _ = generate(var, vae, [2, 0], cfg=3, top_k=20, top_p=0.9, seed=1)
    full = teacher_forced_logits(var, vae, [2, 0], tokens)
    cached = cached_logits(var, vae, [2, 0], tokens)
    assert full.shape == cached.shape == (2, cfg.seq_len, cfg.vocab_size)
    torch.testing.assert_close(full, cached, atol=2e-4, rtol=1e-4)
    # and the check can fail: a wrong token changes later logits
    bad = tokens.clone()
    bad[:, 1] = (bad[:, 1] + 1) % cfg.vocab_size
    assert not torch.allclose(cached_logits(var, vae, [2, 0], bad)[:, 5:], cached[:, 5:], atol=1e-3)


@pytest.mark.parametrize("cfg", [TINY_VAR, VARConfig(**{**TINY_VAR.to_dict(), "shared_aln": True})])
def test_modulations_computed_once_give_the_per_scale_logits(cfg):
    """What the compiled artifact and the ONNX export do: the AdaLN vectors once, from embed."""
    var, _ = tiny_models(var_cfg=cfg) if not cfg.shared_aln else _shared_tiny(cfg)
    with torch.no_grad():
        cond = var.class_emb(torch.tensor([0, 3, var.num_classes, var.num_classes]))
        mods = var.modulations(cond)
        assert mods.shape == (4, 6 * cfg.depth + 2, cfg.width)
        per_scale, once = [KVCache() for _ in var.blocks], [KVCache() for _ in var.blocks]
        x = var.first_input(cond)
        for si, pn in enumerate(cfg.patch_nums):
            want = var.forward_scale(x, cond, per_scale)
            torch.testing.assert_close(var.forward_scale_modulated(x, mods, once), want, atol=0, rtol=0)
            nxt = cfg.patch_nums[min(si + 1, len(cfg.patch_nums) - 1)] ** 2
            x = torch.randn(4, nxt, cfg.width)
        # and it can fail: another class's vectors change the logits
        assert not torch.allclose(var.forward_scale_modulated(x, mods.flip(0), [KVCache() for _ in var.blocks]),
                                  var.forward_scale(x, cond, [KVCache() for _ in var.blocks]), atol=1e-4)


def _shared_tiny(cfg):
    from compiler.model.var import VAR
    from compiler.model.vqvae import VQVAE
    from tests.conftest import TINY_VAE

    torch.manual_seed(0)
    var, vae = VAR(cfg), VQVAE(TINY_VAE, cfg.patch_nums)
    for b in var.blocks:
        torch.nn.init.normal_(b.ada_gss, std=0.3)
    return var.eval(), vae.eval()


def test_attention_matches_a_direct_formula():
    """q and k are L2-normalised, q is scaled by exp(min(s, ln 100)), softmax scale 1."""
    var, _ = tiny_models()
    attn = var.blocks[0].attn
    attn.scale_mul_1H11.data = torch.tensor([[[[1.0]], [[9.0]]]])  # head 1 is clamped to ln 100
    x = torch.randn(2, 5, 64)
    out = attn(x)
    qkv = x @ attn.mat_qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(64), attn.v_bias])
    q, k, v = qkv.view(2, 5, 3, 2, 32).permute(2, 0, 3, 1, 4)
    q = q / q.norm(dim=-1, keepdim=True) * torch.tensor([np.e, 100.0]).view(1, 2, 1, 1)
    k = k / k.norm(dim=-1, keepdim=True)
    ref = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64)
    torch.testing.assert_close(out, attn.proj(ref), atol=1e-5, rtol=1e-5)


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_top_k_top_p(logits, top_k=2, rng=g)) for _ in range(200)}
    assert seen == {0, 1}
    seen = {int(sample_top_k_top_p(logits, top_p=0.7, rng=g)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7; 0.15 and 0.05 are dropped
    assert {int(sample_top_k_top_p(logits, top_k=1, rng=g)) for _ in range(20)} == {0}


def test_kv_cache_grows_by_scale():
    var, _ = tiny_models()
    cache = KVCache()
    for n in (1, 4, 9):
        var.blocks[0].attn(torch.randn(2, n, 64), None, cache)
    assert cache.k.shape == (2, 2, 14, 32)
