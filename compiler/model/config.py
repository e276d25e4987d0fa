"""Model configurations, read off a checkpoint's keys and shapes (nothing assumes d16).

The official code builds VAR-d{D} with heads = D and width = 64·D, and the VQVAE with ch 160 and
ch_mult (1, 1, 2, 2, 4). We never take those for granted: every number below comes from a
tensor shape, so the bundled demo model and all official sizes go through the same path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, asdict

from compiler.errors import UserError


@dataclass(frozen=True)
class VARConfig:
    depth: int
    width: int            # C, the embedding width
    heads: int
    patch_nums: tuple     # side of each scale's token map, coarse to fine
    vocab_size: int       # V, the VQVAE codebook size
    cvae: int             # Cvae, the VQVAE latent width
    num_classes: int      # class_emb has num_classes + 1 rows (the last one is "no class")
    shared_aln: bool      # d36: one shared AdaLN linear plus per-block ada_gss
    mlp_hidden: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def begin_ends(self) -> list:
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VQVAEConfig:
    ch: int
    ch_mult: tuple
    num_res_blocks: int   # encoder blocks per level; the decoder has one more
    z_channels: int       # Cvae
    vocab_size: int
    in_channels: int
    using_sa: bool        # attention at the lowest resolution
    using_mid_sa: bool    # attention in the middle block
    num_phi: int          # shared φ convolutions (share_quant_resi)
    num_scales: int       # rows of ema_vocab_hit_SV (scales the quantizer was trained with)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(sd, key, where):
    if key not in sd:
        raise UserError(f"{where}: missing key '{key}'")
    return tuple(sd[key].shape)


def _count(sd, pattern):
    """Number of distinct integer indices matched by `pattern` (a regex with one group)."""
    rx = re.compile(pattern)
    return len({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def var_config_from_state_dict(sd, where="VAR checkpoint") -> VARConfig:
    depth = _count(sd, r"blocks\.(\d+)\.")
    if depth == 0:
        raise UserError(f"{where}: no 'blocks.N.' keys; this is not a VAR transformer checkpoint")
    width = _shape(sd, "pos_start", where)[-1]
    heads = _shape(sd, "blocks.0.attn.scale_mul_1H11", where)[1]
    if width % heads:
        raise UserError(f"{where}: width {width} is not divisible by {heads} heads")
    lvl = sd.get("lvl_1L")
    if lvl is None:
        raise UserError(f"{where}: missing key 'lvl_1L'")
    counts = [int((lvl[0] == s).sum()) for s in range(int(lvl.max()) + 1)]
    patch_nums = []
    for s, n in enumerate(counts):
        pn = round(n ** 0.5)
        if pn * pn != n:
            raise UserError(f"{where}: 'lvl_1L' gives scale {s} {n} tokens, not a square")
        patch_nums.append(pn)
    vocab, c_head = _shape(sd, "head.weight", where)
    c_word, cvae = _shape(sd, "word_embed.weight", where)
    n_cls = _shape(sd, "class_emb.weight", where)[0] - 1
    mlp_hidden = _shape(sd, "blocks.0.ffn.fc1.weight", where)[0]
    for key, got in (("head.weight", c_head), ("word_embed.weight", c_word)):
        if got != width:
            raise UserError(f"{where}: '{key}' has width {got}, pos_start has {width}")
    return VARConfig(depth=depth, width=width, heads=heads, patch_nums=tuple(patch_nums),
                     vocab_size=vocab, cvae=cvae, num_classes=n_cls,
                     shared_aln="shared_ada_lin.1.weight" in sd, mlp_hidden=mlp_hidden)


def vqvae_config_from_state_dict(sd, where="VQVAE checkpoint") -> VQVAEConfig:
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    if levels == 0:
        raise UserError(f"{where}: no 'encoder.down.N.' keys; this is not a VQVAE checkpoint")
    ch, in_ch = _shape(sd, "encoder.conv_in.weight", where)[:2]
    ch_mult = []
    for lvl in range(levels):
        out = _shape(sd, f"encoder.down.{lvl}.block.0.conv1.weight", where)[0]
        if out % ch:
            raise UserError(f"{where}: 'encoder.down.{lvl}.block.0.conv1.weight' has {out} "
                            f"channels, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    vocab, z = _shape(sd, "quantize.embedding.weight", where)
    return VQVAEConfig(
        ch=ch, ch_mult=tuple(ch_mult),
        num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=z, vocab_size=vocab, in_channels=in_ch,
        using_sa=any(k.startswith(f"encoder.down.{levels - 1}.attn.") for k in sd),
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        num_phi=_count(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\."),
        num_scales=_shape(sd, "quantize.ema_vocab_hit_SV", where)[0],
    )


def check_pair(var: VARConfig, vae: VQVAEConfig, var_name: str, vae_name: str) -> None:
    """A VAR only works with the VQVAE whose codebook and latent width it was trained on."""
    if var.vocab_size != vae.vocab_size:
        raise UserError(f"{var_name} and {vae_name} do not fit together: 'head.weight' predicts "
                        f"{var.vocab_size} tokens, 'quantize.embedding.weight' has {vae.vocab_size}")
    if var.cvae != vae.z_channels:
        raise UserError(f"{var_name} and {vae_name} do not fit together: 'word_embed.weight' takes "
                        f"{var.cvae} channels, 'quantize.embedding.weight' has {vae.z_channels}")
    if vae.num_phi == 0:
        raise UserError(f"{vae_name}: no 'quantize.quant_resi.qresi_ls.N' φ convolutions")
