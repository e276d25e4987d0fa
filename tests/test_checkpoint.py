"""Official checkpoints load strictly; bad files fail with one line naming the file and key."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from compiler.checkpoint import load_models, load_state_dict
from compiler.errors import UserError
from compiler.model.var import KVCache
from tests.conftest import official_state_dict, run_cli


@pytest.fixture(scope="module")
def d16_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("d16")
    torch.save(official_state_dict("var_d16"), d / "var_d16.pth")
    torch.save(official_state_dict("vae_ch160v4096z32"), d / "vae_ch160v4096z32.pth")
    return d / "var_d16.pth", d / "vae_ch160v4096z32.pth"


def test_d16_loads_strictly_and_config_is_read_from_the_file(d16_files):
    var, vae = load_models(*d16_files)
    c = var.cfg
    assert (c.depth, c.width, c.heads, c.vocab_size, c.cvae, c.num_classes) == (16, 1024, 16, 4096, 32, 1000)
    assert c.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and not c.shared_aln
    assert sum(p.numel() for p in var.parameters()) == pytest.approx(310.3e6, rel=1e-3)
    assert vae.cfg.ch == 160 and vae.cfg.ch_mult == (1, 1, 2, 2, 4) and vae.cfg.num_res_blocks == 2
    assert vae.image_size == 256
    # every tensor came from the file, nothing left uninitialised
    sd = torch.load(d16_files[0], weights_only=True)
    for k, v in var.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_d16_safetensors_equals_pth(d16_files, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(d16_files[1], weights_only=True)
    save_file(sd, tmp_path / "vae.safetensors")
    _, vae = load_models(d16_files[0], tmp_path / "vae.safetensors")
    assert torch.equal(vae.quantize.embedding.weight, sd["quantize.embedding.weight"])


def test_d36_shared_adaln_builds_and_runs_at_reduced_depth():
    sd = official_state_dict("var_d36_s512", depth=2)
    from compiler.checkpoint import build_var

    var = build_var(sd, "var_d36_s512.pth")
    c = var.cfg
    assert c.shared_aln and c.depth == 2 and c.width == 2304 and c.heads == 36
    assert c.patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32) and c.seq_len == 2240
    cond = var.class_emb(torch.tensor([207, 1000]))
    caches = [KVCache() for _ in var.blocks]
    x = var.first_input(cond)
    logits = var.forward_scale(x, cond, caches)
    assert logits.shape == (2, 1, 4096) and torch.isfinite(logits).all()
    # a second scale attends to the first through the cache
    b, e = c.begin_ends[1]
    x2 = var.word_embed(torch.randn(2, e - b, 32)) + var.lvl_pos()[:, b:e]
    assert var.forward_scale(x2, cond, caches).shape == (2, 4, 4096)
    assert caches[0].k.shape[2] == 5


# ---------- bad input: one line, the file and the key, exit status 2, no traceback ----------

def _expect_cli_error(var, vae, *needles, tmp_path):
    out = tmp_path / "out"
    r = run_cli("compiler.sample", "--var", var, "--vae", vae, "--top-k", "1", "--out", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert not (out / "samples.npz").exists()
    return lines[0]


def test_missing_file(tiny_ckpts, tmp_path):
    _expect_cli_error(tmp_path / "nope.pth", tiny_ckpts[1], "nope.pth", "no such file", tmp_path=tmp_path)


def test_truncated_file(tiny_ckpts, tmp_path):
    data = tiny_ckpts[0].read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    _expect_cli_error(bad, tiny_ckpts[1], "truncated.pth", "truncated", tmp_path=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/litevar_pwned",))


def test_pickle_carrying_code_is_refused(tiny_ckpts, tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, bad)
    if os.path.exists("/tmp/litevar_pwned"):
        os.unlink("/tmp/litevar_pwned")
    _expect_cli_error(bad, tiny_ckpts[1], "evil.pth", "refused", tmp_path=tmp_path)
    assert not os.path.exists("/tmp/litevar_pwned")


def test_plain_pickle_is_refused(tmp_path, tiny_ckpts):
    bad = tmp_path / "plain.pth"
    bad.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(UserError, match="plain.pth"):
        load_state_dict(bad)


def test_wrong_key(tiny_ckpts, tmp_path):
    sd = torch.load(tiny_ckpts[0], weights_only=True)
    sd["blocks.1.attn.proj.wieght"] = sd.pop("blocks.1.attn.proj.weight")
    torch.save(sd, tmp_path / "renamed.pth")
    _expect_cli_error(tmp_path / "renamed.pth", tiny_ckpts[1], "renamed.pth", "blocks.1.attn.proj.weight", tmp_path=tmp_path)


def test_wrong_shape(tiny_ckpts, tmp_path):
    sd = torch.load(tiny_ckpts[0], weights_only=True)
    sd["blocks.0.ffn.fc2.bias"] = torch.zeros(65)
    torch.save(sd, tmp_path / "shape.pth")
    line = _expect_cli_error(tmp_path / "shape.pth", tiny_ckpts[1], "shape.pth", "blocks.0.ffn.fc2.bias", tmp_path=tmp_path)
    assert "(65,)" in line and "(64,)" in line


def test_var_vae_pair_that_does_not_fit(tiny_ckpts, tmp_path):
    sd = torch.load(tiny_ckpts[1], weights_only=True)
    sd["quantize.embedding.weight"] = torch.zeros(128, 8)
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(4, 128)
    torch.save(sd, tmp_path / "other_vae.pth")
    _expect_cli_error(tiny_ckpts[0], tmp_path / "other_vae.pth", "var_tiny.pth", "other_vae.pth", "128", "64",
                      tmp_path=tmp_path)


def test_a_vae_given_as_var(tiny_ckpts, tmp_path):
    _expect_cli_error(tiny_ckpts[1], tiny_ckpts[1], "vae_tiny.pth", "not a VAR", tmp_path=tmp_path)


def test_var_without_vae_is_an_option_error(tiny_ckpts, tmp_path):
    r = run_cli("compiler.sample", "--var", tiny_ckpts[0], "--out", tmp_path / "o")
    assert r.returncode == 2 and "--var and --vae go together" in r.stderr and "Traceback" not in r.stderr
