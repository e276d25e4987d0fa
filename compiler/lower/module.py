"""The exported module: every function the board calls, with fully static shapes for batch B.

    embed(labels 2B int32)               → (mods, x₀)       mods: the AdaLN vectors (var_graph.py)
    scale_<s>(x, mods, tw, kv_0 … kv_D−1) → (guided logits B×n×V, kv_0 … kv_D−1)   s = 0 … S−1
    next_<s>(idx B×n int32, f_hat)       → (f_hat, x of scale s+1)       s = 0 … S−2
    last(idx B×n int32, f_hat)           → f_hat
    decode(f_hat)                        → images B×3×H×W in [0, 1]
    sample_<s>(logits, u B×n, opts)      → idx B×n int32   CPU builds: top-k/top-p draws at
                                                            quantiles u, opts [top_k, top_p]

The caches are separate tensor arguments (TVM's RPC cannot pass a tuple in), written in place
and also returned. Locally the returned caches are the argument buffers themselves; over RPC
the board's VM copies every argument it is given (`set_input`), so the caller must carry the
returned caches, not its own, into the next scale.
"""
from __future__ import annotations

import functools
import inspect

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec

from compiler.lower.layers import placeholder
from compiler.lower.var_graph import VARGraph
from compiler.lower.vqvae_graph import VQVAEGraph
from schedules.kv_layout import cache_len, cache_row
from schedules.sampling import sample_rows


class GenerationModule(nn.Module):
    def __init__(self, var, vae, plan=None, gpu: str | bool = False, int_dot: str | None = None):
        self.cfg = var.cfg
        self.var = VARGraph(var, plan, gpu, int_dot)
        self.vae = VQVAEGraph(vae, var.cfg, gpu)
        S = len(self.cfg.patch_nums)
        for si in range(S):
            setattr(self, f"scale_{si}", self._scale_function(si))
        for si in range(S - 1):
            setattr(self, f"next_{si}", functools.partial(self._next, si))
        self.sampler = not gpu   # GPU builds hand the logits to device/sampling.py
        if self.sampler:
            for si in range(S):
                setattr(self, f"sample_{si}", self._sample)

    def _scale_function(self, si):
        """scale_<si>(x, mods, tw, kv_0, …, kv_{D−1}) with those parameter names (nn's export
        names the function's inputs after them)."""
        def scale(x, mods, tw, *kv):
            logits, kv = self.var.scale(si, x, mods, tw, kv)
            return (logits, *kv)
        names = ["x", "mods", "tw"] + [f"kv_{d}" for d in range(self.cfg.depth)]
        scale.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        return scale

    def embed(self, labels):
        return self.var.embed(labels)

    def _next(self, si, idx, f_hat):
        f_hat, nxt = self.vae.update(si, idx, f_hat)
        return f_hat, self.var.next_input(si + 1, nxt)

    def last(self, idx, f_hat):
        return self.vae.update(len(self.cfg.patch_nums) - 1, idx, f_hat)[0]

    def decode(self, f_hat):
        return self.vae.decode(f_hat)

    def _sample(self, logits, u, opts):
        B, n, V = logits.shape
        idx = op.tensor_ir_op(sample_rows(int(B) * int(n), int(V)), "sample",
                              [op.reshape(logits, [B * n, V]), op.reshape(u, [B * n]), opts], placeholder([B * n], "int32"))
        return op.reshape(idx, [B, n])

    def spec(self, batch: int) -> dict:
        cfg, B = self.cfg, batch
        NB, C, P = 2 * B, cfg.width, cfg.patch_nums[-1]
        f32 = "float32"
        row = cache_row(cache_len(cfg.patch_nums), cfg.head_dim)   # key panels, then values (schedules/kv_layout.py)
        kv = {f"kv_{d}": spec.Tensor([2, NB, cfg.heads, row], f32) for d in range(cfg.depth)}
        f_hat = spec.Tensor([B, cfg.cvae, P, P], f32)
        plain = {"$": {"param_mode": "plain", "effect_mode": "none"}}
        out = {"embed": {"labels": spec.Tensor([NB], "int32"), **plain}}
        for si, pn in enumerate(cfg.patch_nums):
            out[f"scale_{si}"] = {"x": spec.Tensor([NB, pn * pn, C], f32), "mods": spec.Tensor([NB, 6 * cfg.depth + 2, C], f32),
                                  "tw": spec.Tensor([2], f32), **kv, **plain}
            idx = spec.Tensor([B, pn * pn], "int32")
            name = f"next_{si}" if si < len(cfg.patch_nums) - 1 else "last"
            out[name] = {"idx": idx, "f_hat": f_hat, **plain}
            if self.sampler:
                out[f"sample_{si}"] = {"logits": spec.Tensor([B, pn * pn, cfg.vocab_size], f32),
                                       "u": spec.Tensor([B, pn * pn], f32), "opts": spec.Tensor([2], f32), **plain}
        out["decode"] = {"f_hat": f_hat, **plain}
        return out
