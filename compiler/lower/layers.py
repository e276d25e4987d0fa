"""Graph layers that call the kernels of schedules/: dense (fp32, fp16, W8A8, W4A16, W4A8) and attention."""
from __future__ import annotations

import math

import torch
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from compiler.compress.quant import QuantLinear
from compiler.lower.params import param
from compiler.errors import UserError
from schedules import matmul, qmatmul


def placeholder(shape, dtype="float32"):
    return nn.Tensor.placeholder(list(shape), dtype)


class Dense(nn.Module):
    """y = x·Wᵀ + b from a torch Linear or a QuantLinear (fp16, w8a8, w4a16, w4a8), the weights in the
    layout of the target's kernel: panels (CPU) or K×O (GPU: DLight's matmuls, and on CUDA our
    kernel for layers of at most matmul.ROWS_GPU rows). `gpu`: False, "cuda" or "opencl";
    `int_dot`: the CPU's integer dot product for W8A8 and W4A8 ("vpdpbusd", "pmaddwd", "sdot" or None; CUDA
    W8A8 runs on dp4a)."""

    def __init__(self, linear, bias=None, gpu: str | bool = False, int_dot: str | None = None):
        self.gpu = gpu
        scheme = linear.scheme if isinstance(linear, QuantLinear) else None
        if gpu:   # CUDA W8A8 on dp4a; other GPU layers are Relax matmuls
            cuda_w8a8 = gpu == "cuda" and scheme is not None and scheme.name == "w8a8"
            self.dot = qmatmul.dot_for("dp4a" if cuda_w8a8 else None, linear.in_features)
        else:
            self.dot = qmatmul.cpu_dot(int_dot, scheme.name if scheme else "fp32", linear.in_features,
                                       scheme.group if scheme else None)
        if isinstance(linear, QuantLinear) and linear.scheme.name != "fp16":
            self.scheme, self.group = linear.scheme.name, linear.scheme.group
            if self.scheme not in ("w8a8", "w4a16", "w4a8"):
                raise UserError(f"scheme {self.scheme} is simulation-only and has no compiled kernel")
            if not gpu:
                wq, ws = qmatmul.pack_cpu(self.scheme, linear.qweight.numpy(), linear.scales.numpy(), self.dot)
            elif self.scheme == "w8a8":
                q = linear.qweight.numpy()
                wq = qmatmul.pack_dp4a(q) if self.dot == "dp4a" else matmul.pack_weight(q, gpu)
                ws = linear.scales.float().numpy()
            else:
                scales = linear.scales
                if gpu == "opencl":   # fp16 is optional in OpenCL: float32 holds the float16 scales exactly
                    assert self.scheme != "w4a8", "compiler.build.check_plan_fits refuses w4a8 on OpenCL"
                    scales = scales.float()
                wq, ws = qmatmul.pack_int4(linear.qweight.numpy(), scales.numpy(), True)
            self.wp, self.sw = param(wq), param(ws)
            O, K = linear.out_features, linear.in_features
        else:   # float weights: float32, or float16 (fp16) where the kernels read them; OpenCL,
            # whose float16 is optional, holds fp16's values as float32
            self.scheme, self.group = ("fp16" if isinstance(linear, QuantLinear) else "fp32"), None
            half = self.scheme == "fp16" and gpu != "opencl"
            w = linear.weight.detach()
            w = (w.half() if half else w.float()).numpy()
            self.wp = param(matmul.pack_weight(w, gpu))
            O, K = w.shape
        b = bias if bias is not None else linear.bias
        self.b = param(b.float() if b is not None else torch.zeros(O))
        self.in_features, self.out_features = K, O

    def forward(self, x, gelu: bool = False):
        """y = x·Wᵀ + b over the last axis; with `gelu`, GELU(y) (ffn.fc1)."""
        lead = list(x.shape[:-1])
        M = 1
        for d in lead:
            M *= int(d)
        K, O = self.in_features, self.out_features
        x2 = op.reshape(x, [M, K])
        if self.gpu:
            y = self._forward_gpu(x2, M, K, gelu)
        else:
            Mp = padded_rows(M)
            y = unpad_rows(self.rows(pad_rows(x2, Mp), Mp, gelu), M)
        return op.reshape(y, lead + [O])

    def rows(self, x2, M, gelu: bool = False):
        """The CPU kernel on x2 M×K, M already padded_rows(…) → M×O."""
        O = self.out_features
        if self.scheme in ("fp32", "fp16"):
            kernel = matmul.dense_fp32(M, self.in_features, O, gelu, "float16" if self.scheme == "fp16" else "float32")
            return op.tensor_ir_op(kernel, "dense", [x2, self.wp, self.b], placeholder([M, O]))
        sx = op.zeros([1, 1], "float32")  # w4a16 keeps float activations: no scales
        if self.scheme != "w4a16":
            x2, sx = quantize(x2, M, self.in_features, False)
        kernel = qmatmul.cpu_kernel(M, self.in_features, O, self.scheme, self.group, self.dot)
        y = op.tensor_ir_op(kernel, f"dense_{self.scheme}", [x2, sx, self.wp, self.sw, self.b], placeholder([M, O]))
        if self.scheme != "w4a16":
            y = op.add(y, self.b)
        return gelu_tanh(y) if gelu else y

    def _forward_gpu(self, x2, M, K, gelu: bool):
        """Plain Relax matmuls (weights K×O) that DLight's GPU rules schedule, fused with the
        epilogue, except on CUDA for few rows (VAR's first scales), where our kernels split K
        between threads instead of DLight's row tiles; W8A8 multiplies int8 by int8 into int32
        like the CPU kernel (on CUDA with dp4a, in our kernels)."""
        O = self.out_features
        if self.scheme in ("fp32", "fp16") and self.gpu == "cuda" and M <= matmul.ROWS_GPU:
            kernel = matmul.dense_rows_gpu(M, K, O, gelu, wdtype=self.wp.dtype)
            return op.tensor_ir_op(kernel, "dense_rows", [x2, self.wp, self.b], placeholder([M, O]))
        y = self._matmul_gpu(x2, M, K)
        return gelu_tanh(y) if gelu else y

    def _matmul_gpu(self, x2, M, K):
        """x2·W + b on the GPU, on DLight's matmuls or dp4a (_forward_gpu)."""
        O = self.out_features
        if self.scheme in ("fp32", "fp16"):
            w = self.wp if self.wp.dtype == "float32" else op.astype(self.wp, "float32")
            return op.add(op.matmul(x2, w), self.b)
        if self.scheme == "w4a16":
            w = op.tensor_expr_op(qmatmul.dequantize_gpu(K, O, self.group), "dequantize", [self.wp, self.sw])
            return op.add(op.matmul(x2, w), self.b)
        xq, sx = quantize(x2, M, K, True)
        if self.scheme == "w4a8":
            y = op.tensor_ir_op(qmatmul.dense_w4a8_gpu(M, K, O, self.group), "dense_w4a8", [xq, sx, self.wp, self.sw],
                                placeholder([M, O]))
            return op.add(y, self.b)
        if self.dot == "dp4a":
            few = M <= qmatmul.ROWS_DP4A
            kernel = qmatmul.dense_w8a8_dp4a_rows(M, K, O) if few else qmatmul.dense_w8a8_dp4a(M, K, O)
            y = op.tensor_ir_op(kernel, "dense_w8a8_dp4a_rows" if few else "dense_w8a8_dp4a",
                                [xq, sx, self.wp, self.sw], placeholder([M, O]))
            # the kernel is opaque, so its last multiply cannot meet the add in one FMA (below):
            # the add fuses with what follows (GELU, the residual), one kernel fewer a layer
            return op.add(y, self.b)
        else:   # OpenCL: an int8 matmul for DLight
            acc = op.matmul(xq, self.wp, out_dtype="int32")
            y = op.multiply(op.multiply(op.astype(acc, "float32"), sx), self.sw)
        return op.tensor_ir_op(matmul.add_bias_gpu(M, O), "add_bias", [y, self.b], placeholder([M, O]))


def padded_rows(M: int) -> int:
    """Rows the CPU kernels run, from 64 rows on: M rounded up to a multiple of 6, the best
    register tile of every CPU dense kernel (512 → 516 rows; d16's scale 8 has 2·13² = 338 tokens,
    which only tiles of 2 rows divide, at two thirds of the speed of 4). The padding copies cost
    far less than the tiles save, and layers that share their rows (fc1 → fc2) pad alike whatever
    their schemes."""
    return M if M < 64 else (M + 5) // 6 * 6


def pad_rows(x2, Mp: int):
    M = int(x2.shape[0])
    return op.pad(x2, [0, Mp - M, 0, 0]) if Mp != M else x2


def unpad_rows(y, M: int):
    return op.split(y, [M], axis=0)[0] if int(y.shape[0]) != M else y


def gelu_tanh(x):
    """GELU, tanh form, written out: relax's gelu_tanh lowers to a scalar libm tanh per element on
    CPUs (6 ms for 512×512 here); a plain tanh lets the CPU pipeline use TVM's vectorisable
    fast_tanh (relax.transform.FastMathTransform; 4× faster, within 1e-6). The fp32 CPU kernel
    computes it in its epilogue instead (schedules/matmul.py)."""
    return x * 0.5 * (op.tanh((x * x * x * 0.044715 + x) * math.sqrt(2 / math.pi)) + 1.0)


def quantize(x2, M, K, gpu):
    """Per-token int8 activations and their scales (the kernels of schedules/matmul.py)."""
    kernel = matmul.quantize_per_token_gpu(M, K) if gpu else matmul.quantize_per_token(M, K)
    return op.tensor_ir_op(kernel, "quantize_per_token", [x2],
                           [placeholder([M, K], "int8"), placeholder([M, 1])])
