"""How much a compressed model's samples differ from the reference model's, on the same seeds."""
from __future__ import annotations

import torch

from compiler.sampler import autoregress, generate


def generate_batched(var, vae, labels, *, batch=25, seed=0, progress=None, **sampling):
    """generate() in chunks; chunk k uses seed + k (as compiler.sample does)."""
    toks, imgs = [], []
    for k, i in enumerate(range(0, len(labels), batch)):
        t, im = generate(var, vae, labels[i:i + batch], seed=seed + k, **sampling)
        toks.append(t)
        imgs.append(im)
        if progress is not None:
            progress(len(labels[i:i + batch]))
    return torch.cat(toks), torch.cat(imgs)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR over images in [0, 1] (identical images count as 100 dB)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return float(torch.where(mse > 0, 10 * torch.log10(1 / mse.clamp(min=1e-10)), torch.full_like(mse, 100.0)).mean())


@torch.no_grad()
def logit_kl(ref, comp, vae, labels, tokens, cfg=4.0) -> float:
    """Mean KL(ref ‖ comp) of the guided next-token distributions along the reference tokens."""
    begin_ends = ref.cfg.begin_ends
    forced = lambda si, logits: tokens[:, begin_ends[si][0]:begin_ends[si][1]]  # noqa: E731
    lp = autoregress(ref, vae, labels, forced, cfg=cfg)[2].log_softmax(-1)
    lq = autoregress(comp, vae, labels, forced, cfg=cfg)[2].log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def greedy_agreement(ref, comp, vae, labels, cfg=4.0, batch=25):
    """Greedy tokens of both models: (share of equal tokens, PSNR of their images, ref tokens)."""
    t_ref, i_ref = generate_batched(ref, vae, labels, batch=batch, cfg=cfg, top_k=1, top_p=0.0)
    t_cmp, i_cmp = generate_batched(comp, vae, labels, batch=batch, cfg=cfg, top_k=1, top_p=0.0)
    return float((t_ref == t_cmp).double().mean()), psnr_db(i_ref, i_cmp), t_ref
