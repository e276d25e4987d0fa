"""Writing generated samples, the same way on the build machine and on the board: one PNG per
image, grid.png, samples.npz (`tokens` B×L int64, `images` B×3×H×W float32 in [0, 1],
`labels`) and meta.json, each written atomically."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from device.fileio import atomic_path, ensure_writable_dir


def to_uint8(images: np.ndarray) -> np.ndarray:
    """B×3×H×W floats in [0, 1] → B×H×W×3 uint8 (round half up, as PIL's ToPILImage does)."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


def grid(images_u8: np.ndarray, cols: int, upscale: int = 1) -> Image.Image:
    B, H, W, _ = images_u8.shape
    rows = -(-B // cols)
    canvas = np.full((rows * (H + 2) + 2, cols * (W + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images_u8):
        r, c = divmod(i, cols)
        canvas[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = im
    img = Image.fromarray(canvas)
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST) if upscale > 1 else img


def save_samples(out, labels, tokens: np.ndarray, images: np.ndarray, meta: dict, cols: int | None = None):
    """PNG per image, a grid, samples.npz and meta.json, each written atomically."""
    out = ensure_writable_dir(out)
    u8 = to_uint8(images)
    for i, (lab, im) in enumerate(zip(labels, u8)):
        with atomic_path(out / f"{i:03d}_class{lab}.png") as tmp:
            Image.fromarray(im).save(tmp, format="PNG")
    upscale = max(1, 128 // u8.shape[1])
    with atomic_path(out / "grid.png") as tmp:
        grid(u8, cols or min(len(labels), 10), upscale).save(tmp, format="PNG")
    with atomic_path(out / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, tokens=tokens.astype(np.int64), images=images.astype(np.float32),
                 labels=np.asarray(labels, np.int64))
    with atomic_path(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
