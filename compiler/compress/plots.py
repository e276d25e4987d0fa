"""The pictures of a compression report (the LiteVAR paper's Figures 2a, 2b and 5)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from compiler.compress.mdwa import scale_mask  # noqa: E402
from compiler.fileio import atomic_path  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def attention_maps(stats, patch_nums, path, windows=None, max_panels=6):
    """Mean attention maps of the last scales; the kept band of the plan outlined in white."""
    keys = sorted(stats.maps, key=lambda k: (int(k.split("_q")[1]), k))[::-1][:max_panels]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        b, h, q = (int(x[1:]) for x in key.split("_"))
        m = stats.maps[key]
        top = float(np.log10(m.max()))
        ax.imshow(np.log10(m + 1e-9), aspect="auto", cmap="magma", vmin=top - 2.5, vmax=top, interpolation="nearest")
        if windows is not None:
            kept = scale_mask(windows[b][h][q], patch_nums, q).numpy()
            ax.contour(kept.astype(float), levels=[0.5], colors="white", linewidths=0.6)
        edges = np.cumsum([p * p for p in patch_nums[:q + 1]])[:-1]
        for e in edges:
            ax.axvline(e - 0.5, color="cyan", lw=0.4, alpha=0.6)
        ax.set_title(f"block {b}, head {h}, query scale {q} ({patch_nums[q]}×{patch_nums[q]})", fontsize=9)
        ax.set_xlabel("key token (scales coarse → fine)")
        ax.set_ylabel("query token")
    fig.suptitle("Mean attention (log10); white: MDWA kept band", fontsize=10)
    _save(fig, path)


def cond_uncond_similarity(stats, path, asc_share=None):
    """Cosine similarity of CFG halves' attention outputs per block and scale (Figure 2b)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for ax, (title, data) in zip(axes, (("cosine(cond, uncond) output", stats.cos),
                                        ("1 − rel. error, share map", stats.sim_map),
                                        ("1 − rel. error, share output", stats.sim_output))):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=min(0.5, float(data.min())), vmax=1)
        ax.set_xlabel("scale")
        ax.set_ylabel("block")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
        if asc_share is not None:
            for b, row in enumerate(asc_share):
                for s, on in enumerate(row):
                    if on:
                        ax.text(s, b, "•", ha="center", va="center", color="red", fontsize=8)
    fig.suptitle("CFG halves attend alike (red dot: ASC shares this block and scale)", fontsize=10)
    _save(fig, path)


def sensitivity_bars(results: dict, metric: str, path, baseline=None, title=""):
    """One bar per layer type at the lower precision (Figure 5)."""
    names = list(results)
    vals = [results[n][metric] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.4))
    ax.bar(names, vals, color=["tab:red" if v == max(vals) else "tab:blue" for v in vals])
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label="all at the base precision")
        ax.legend(fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    _save(fig, path)


def side_by_side(ref_u8, cmp_u8, cols, path, upscale=4):
    """Reference grid | compressed grid, same seeds."""
    from device.output import grid

    a, b = grid(ref_u8, cols, upscale), grid(cmp_u8, cols, upscale)
    fig, axes = plt.subplots(1, 2, figsize=(2 * a.width / 110 + 1, a.height / 110 + 0.6))
    for ax, im, title in zip(axes, (a, b), ("reference", "compressed")):
        ax.imshow(im)
        ax.set_title(title)
        ax.axis("off")
    _save(fig, path)
