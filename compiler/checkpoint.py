"""Load VAR and VQVAE checkpoints safely and strictly.

- `.pth` files go through `torch.load(weights_only=True)`: a pickle that carries code is refused.
- `.safetensors` files go through safetensors.
- Every key and shape is checked against the model built from the file's own shapes, and any
  difference is reported as one line naming the file and the key.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from compiler.errors import UserError
from compiler.model.config import check_pair, var_config_from_state_dict, vqvae_config_from_state_dict
from compiler.model.var import VAR
from compiler.model.vqvae import VQVAE

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_VAR = DEMO_DIR / "var_demo.pth"
DEMO_VAE = DEMO_DIR / "vae_demo.pth"


def load_state_dict(path) -> dict:
    """Read a plain state dict of tensors from `.pth` (weights only) or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"{path}: refused, the pickle holds more than tensors "
                            f"(loaded with weights_only=True): {_first_line(e, skip='Weights only load failed')}") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise UserError(f"{path}: truncated or not a PyTorch checkpoint ({_first_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    return sd


def _first_line(e: Exception, skip: str = "") -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not (skip and ln.startswith(skip))] or lines
    if not lines:
        return type(e).__name__
    first = lines[0]
    return first[: first.find(". ") + 1] if ". " in first else first[:300]


def load_strict(model: torch.nn.Module, sd: dict, path) -> None:
    """load_state_dict(strict=True), with a one-line error that names the first bad key."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{path}: missing key '{missing[0]}'{more}")
    unexpected = [k for k in sd if k not in want]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{path}: unexpected key '{unexpected[0]}'{more}")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{path}: key '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True)


def build_var(sd: dict, path="VAR checkpoint") -> VAR:
    cfg = var_config_from_state_dict(sd, str(path))
    model = _empty(VAR, cfg)
    load_strict(model, sd, path)
    return model.eval().requires_grad_(False)


def _empty(cls, *args):
    """Build a module without initialising it (every tensor is then loaded from the file);
    random init of a 2-billion-parameter model would take minutes."""
    with torch.device("meta"):
        model = cls(*args)
    return model.to_empty(device="cpu")


def build_vqvae(sd: dict, patch_nums, path="VQVAE checkpoint") -> VQVAE:
    cfg = vqvae_config_from_state_dict(sd, str(path))
    model = _empty(VQVAE, cfg, patch_nums)
    load_strict(model, sd, path)
    return model.eval().requires_grad_(False)


def load_models(var_path=None, vae_path=None):
    """(var, vae) from two checkpoint files, or the bundled demo model when both are None."""
    if (var_path is None) != (vae_path is None):
        raise UserError("--var and --vae go together: give both checkpoints, or neither for the demo model")
    var_path = Path(var_path) if var_path else DEMO_VAR
    vae_path = Path(vae_path) if vae_path else DEMO_VAE
    var_sd, vae_sd = load_state_dict(var_path), load_state_dict(vae_path)
    var_cfg = var_config_from_state_dict(var_sd, str(var_path))
    vae_cfg = vqvae_config_from_state_dict(vae_sd, str(vae_path))
    check_pair(var_cfg, vae_cfg, str(var_path), str(vae_path))
    return build_var(var_sd, var_path), build_vqvae(vae_sd, var_cfg.patch_nums, vae_path)
