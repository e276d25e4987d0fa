"""Train the bundled demo model: a small class-conditional VAR and its multi-scale VQVAE on
scikit-learn's digits, plus the digit classifier that judges samples.

    python -m compiler.train_demo [--out compiler/demo_model] [--stage all|vqvae|var|judge]

Seeded and single-process, so a rerun on the same machine gives the same weights. The token
schedule is VAR-256's (1,2,3,4,5,6,8,10,13,16; L = 680), so per-scale shapes match the real
model; the VQVAE downsamples 2× (32 px images) and the transformer is 4 blocks of width 128 (2 heads of 64).
Weights are written in the official state-dict format.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from compiler.checkpoint import DEMO_DIR, load_state_dict
from compiler.digits import DigitJudge, load_split, render
from compiler.errors import cli
from compiler.fileio import atomic_path
from compiler.model.config import VARConfig, VQVAEConfig
from compiler.model.var import VAR
from compiler.model.vqvae import VQVAE

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VQVAE_DEMO = VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, vocab_size=1024,
                         in_channels=3, using_sa=True, using_mid_sa=True, num_phi=4, num_scales=len(PATCH_NUMS))
VAR_DEMO = VARConfig(depth=4, width=128, heads=2, patch_nums=PATCH_NUMS, vocab_size=1024, cvae=32,
                     num_classes=10, shared_aln=False, mlp_hidden=512)


def augmented_train_set(copies: int, seed: int):
    """`copies` randomly moved renderings of every training digit (32×32 RGB in [-1, 1])."""
    x8, y = load_split("train")
    g = torch.Generator().manual_seed(seed)
    xs = [render(x8, g, augment=(i > 0)) for i in range(copies)]
    return torch.cat(xs), y.repeat(copies)


def cosine_lr(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save(model: nn.Module, path: Path):
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp)


def train_vqvae(steps: int, batch: int, seed: int, copies: int = 8) -> tuple[VQVAE, dict]:
    torch.manual_seed(seed)
    imgs, _ = augmented_train_set(copies=copies, seed=seed)
    vae = VQVAE(VQVAE_DEMO, PATCH_NUMS)
    nn.init.uniform_(vae.quantize.embedding.weight, -1 / 1024, 1 / 1024)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="vqvae", mininterval=2)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, 100)
        x = imgs[torch.randint(len(imgs), (batch,), generator=g)]
        rec, vq_loss = vae(x)
        rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 99 and step < steps * 0.8:
            _restart_dead_codes(vae, x, g)
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{vq_loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        x = imgs[:512]
        rec = vae.fhat_to_img(vae.quantize(vae.quant_conv(vae.encoder(x)))[0])
        idx = torch.cat(vae.img_to_idx(x), 1)
    stats = {"steps": steps, "batch": batch, "recon_mse": F.mse_loss(rec, x).item(),
             "codebook_used": int(idx.unique().numel())}
    return vae, stats


@torch.no_grad()
def _restart_dead_codes(vae: VQVAE, x, g):
    """Move codebook entries this batch did not pick onto encoder features, so the codebook gets used."""
    q = vae.quantize
    hit = torch.zeros(q.vocab_size, dtype=torch.bool)
    hit[torch.cat(vae.img_to_idx(x), 1).unique()] = True
    dead = (~hit).nonzero().flatten()
    if len(dead) == 0:
        return
    f = vae.quant_conv(vae.encoder(x)).permute(0, 2, 3, 1).reshape(-1, q.Cvae)
    pick = f[torch.randint(len(f), (len(dead),), generator=g)]
    q.embedding.weight.data[dead] = pick * 0.1 + torch.randn(pick.shape, generator=g) * 1e-3


def init_var(var: VAR):
    """The official init: truncated normal, small AdaLN gains, tiny residual gates and head."""
    C, depth = var.cfg.width, var.cfg.depth
    std = math.sqrt(1 / C / 3)
    for m in var.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for p in (var.pos_start, var.pos_1LC):
        nn.init.trunc_normal_(p, std=std)
    var.head.weight.data.mul_(0.02)
    var.head_nm.ada_lin[-1].weight.data.mul_(0.5)
    for b in var.blocks:
        b.attn.proj.weight.data.div_(math.sqrt(2 * depth))
        b.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
        b.ada_lin[-1].weight.data[2 * C:].mul_(0.5)
        b.ada_lin[-1].weight.data[:2 * C].mul_(1e-5)


def train_var(vae: VQVAE, steps: int, batch: int, seed: int, copies: int = 12) -> tuple[VAR, dict]:
    torch.manual_seed(seed)
    imgs, labels = augmented_train_set(copies=copies, seed=seed + 2)
    with torch.no_grad():
        tokens = torch.cat([torch.cat(vae.img_to_idx(imgs[i:i + 256]), 1) for i in range(0, len(imgs), 256)])
    var = VAR(VAR_DEMO)
    init_var(var)
    params_decay = [p for n, p in var.named_parameters() if p.ndim >= 2 and "pos" not in n and "emb" not in n]
    params_other = [p for n, p in var.named_parameters() if not (p.ndim >= 2 and "pos" not in n and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": params_decay, "weight_decay": 0.05}, {"params": params_other, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95))
    # Every scale weighs the same in the loss: the coarse scales decide the digit's identity.
    scale_of_token = var.lvl_1L[0]
    w = 1.0 / torch.bincount(scale_of_token).float()[scale_of_token]
    w = w / w.sum()
    g = torch.Generator().manual_seed(seed + 3)
    bar = tqdm(range(steps), desc="var", mininterval=2)
    for step in bar:
        lr = cosine_lr(step, steps, 2e-3, 100)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(tokens), (batch,), generator=g)
        tok, lab = tokens[pick], labels[pick].clone()
        lab[torch.rand(batch, generator=g) < 0.1] = VAR_DEMO.num_classes  # class dropout for CFG
        with torch.no_grad():
            x_in = vae.quantize.idx_to_var_input([tok[:, b:e] for b, e in var.cfg.begin_ends])
        logits = var(lab, x_in)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok.reshape(-1), reduction="none").view(batch, -1)
        loss = (ce * w).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    return var.eval(), {"steps": steps, "batch": batch, "final_loss": loss.item(), "train_images": len(tokens)}


def train_judge(steps: int, seed: int) -> tuple[DigitJudge, dict]:
    torch.manual_seed(seed)
    imgs, labels = augmented_train_set(copies=8, seed=seed + 4)
    imgs = (imgs + 1) / 2
    judge = DigitJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 5)
    for step in tqdm(range(steps), desc="judge", mininterval=2):
        pick = torch.randint(len(imgs), (128,), generator=g)
        loss = F.cross_entropy(judge(imgs[pick]), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval()
    x8, y = load_split("test")
    with torch.no_grad():
        acc = (judge((render(x8) + 1) / 2).argmax(1) == y).float().mean().item()
    return judge, {"steps": steps, "heldout_accuracy": acc}


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR, help="where the weights go (default: the bundled demo)")
    ap.add_argument("--stage", choices=["all", "vqvae", "var", "judge"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vqvae-steps", type=int, default=450)
    ap.add_argument("--var-steps", type=int, default=900)
    ap.add_argument("--judge-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="VAR batch size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed for reproducibility)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log_path = args.out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}

    if args.stage in ("all", "vqvae"):
        t0 = time.time()
        vae, stats = train_vqvae(args.vqvae_steps, 32, args.seed)
        save(vae, args.out / "vae_demo.pth")
        log["vqvae"] = {**stats, "seconds": round(time.time() - t0, 1)}
    if args.stage in ("all", "var"):
        vae = VQVAE(VQVAE_DEMO, PATCH_NUMS)
        vae.load_state_dict(load_state_dict(args.out / "vae_demo.pth"))
        vae.eval().requires_grad_(False)
        t0 = time.time()
        var, stats = train_var(vae, args.var_steps, args.batch, args.seed)
        save(var, args.out / "var_demo.pth")
        log["var"] = {**stats, "seconds": round(time.time() - t0, 1)}
    if args.stage in ("all", "judge"):
        t0 = time.time()
        judge, stats = train_judge(args.judge_steps, args.seed)
        save(judge, args.out / "digit_judge.pth")
        log["judge"] = {**stats, "seconds": round(time.time() - t0, 1)}
    log["torch"] = torch.__version__
    with atomic_path(log_path) as tmp:
        tmp.write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
