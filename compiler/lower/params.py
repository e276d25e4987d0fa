"""Parameters that carry their values: the graph modules are built from a loaded PyTorch model,
so each nn.Parameter is created together with the array it will be bound to at run time."""
from __future__ import annotations

import numpy as np
import torch
from tvm.relax.frontend import nn


def param(value) -> nn.Parameter:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    p = nn.Parameter(tuple(arr.shape), str(arr.dtype))
    p.np_value = np.ascontiguousarray(arr)
    return p


def param_arrays(named_params) -> dict:
    """name → numpy array, in the order of export_tvm's parameter list."""
    return {name: p.np_value for name, p in named_params}
