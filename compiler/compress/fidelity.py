"""How much a compressed model's samples differ from the reference model's, on the same seeds."""
from __future__ import annotations

import torch

from compiler.sampler import autoregress, generate, sample_top_k_top_p


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


def _chunks(labels, batch):
    return [labels[i:i + batch] for i in range(0, len(labels), batch)]


@torch.no_grad()
def greedy_run(model, vae, labels, cfg=4.0, batch=25):
    """Greedy generation: (tokens B×L, images, guided log-probabilities B×L×V)."""
    greedy = lambda si, logits: sample_top_k_top_p(logits, top_k=1)  # noqa: E731
    toks, imgs, logps = [], [], []
    for chunk in _chunks(labels, batch):
        t, f_hat, logits = autoregress(model, vae, chunk, greedy, cfg=cfg)
        toks.append(t)
        imgs.append(vae.fhat_to_img(f_hat).add_(1).mul_(0.5))
        logps.append(logits.log_softmax(-1))
    return torch.cat(toks), torch.cat(imgs), torch.cat(logps)


@torch.no_grad()
def forced_logprobs(model, vae, labels, tokens, cfg=4.0, batch=25):
    """Guided log-probabilities of `model` along given tokens (teacher forcing on the cached path)."""
    begin_ends, out = model.cfg.begin_ends, []
    for i, chunk in zip(range(0, len(labels), batch), _chunks(labels, batch)):
        t = tokens[i:i + batch]
        forced = lambda si, logits, t=t: t[:, begin_ends[si][0]:begin_ends[si][1]]  # noqa: E731
        out.append(autoregress(model, vae, chunk, forced, cfg=cfg)[2].log_softmax(-1))
    return torch.cat(out)


def greedy_fidelity(reference, comp, vae, labels, cfg=4.0, batch=25) -> dict:
    """Against a reference `greedy_run` on the same labels: share of equal greedy tokens, PSNR of
    the greedy images, and mean KL(reference ‖ compressed) of the next-token distributions along
    the reference tokens."""
    t_ref, i_ref, lp = reference
    t_cmp, i_cmp, _ = greedy_run(comp, vae, labels, cfg, batch)
    lq = forced_logprobs(comp, vae, labels, t_ref, cfg, batch)
    return {"token_agreement": float((t_ref == t_cmp).double().mean()), "psnr_greedy_db": psnr_db(i_ref, i_cmp),
            "logit_kl": float((lp.exp() * (lp - lq)).sum(-1).mean())}
