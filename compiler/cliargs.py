"""Command-line options shared by the commands that load a model and sample from it."""
from __future__ import annotations


def add_model_args(ap):
    ap.add_argument("--var", help="VAR checkpoint (.pth or .safetensors); default: the demo model")
    ap.add_argument("--vae", help="VQVAE checkpoint (.pth or .safetensors); default: the demo model")


def add_sampler_args(ap):
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance at the last scale (default 4)")
    ap.add_argument("--top-k", type=int, default=900, help="keep the k most likely tokens; 1 is greedy (default 900)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus threshold, 0 disables (default 0.95)")
    ap.add_argument("--seed", type=int, default=0)
