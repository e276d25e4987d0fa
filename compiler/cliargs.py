"""Command-line options shared by the commands that load a model and sample from it."""
from __future__ import annotations

from device.cliargs import add_sampler_args  # noqa: F401  (shared with the board's CLI)


def add_model_args(ap):
    ap.add_argument("--var", help="VAR checkpoint (.pth or .safetensors); default: the demo model")
    ap.add_argument("--vae", help="VQVAE checkpoint (.pth or .safetensors); default: the demo model")
