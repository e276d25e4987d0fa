"""Graph layers that call the kernels of schedules/: dense (fp32 or W8A8) and attention."""
from __future__ import annotations

import torch
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from compiler.compress.quant import QuantLinear
from compiler.lower.params import param
from schedules import matmul


def placeholder(shape, dtype="float32"):
    return nn.Tensor.placeholder(list(shape), dtype)


class Dense(nn.Module):
    """y = x·Wᵀ + b from a torch Linear or a W8A8 QuantLinear; weights packed in panels (CPU)
    or transposed to K×O (GPU, for DLight)."""

    def __init__(self, linear, bias=None, gpu: bool = False):
        self.gpu = gpu
        if isinstance(linear, QuantLinear):
            if linear.scheme.name != "w8a8":
                raise NotImplementedError(f"scheme {linear.scheme.name} has no compiled kernel yet")
            self.scheme = "w8a8"
            w = linear.qweight.numpy()
            self.sw = param(linear.scales.float())
        else:
            self.scheme = "fp32"
            w = linear.weight.detach().float().numpy()
        self.wp = param(matmul.pack_weight(w, gpu))
        O, K = w.shape
        b = bias if bias is not None else linear.bias
        self.b = param(b.float() if b is not None else torch.zeros(O))
        self.in_features, self.out_features = K, O

    def forward(self, x):
        lead = list(x.shape[:-1])
        M = 1
        for d in lead:
            M *= int(d)
        K, O, gpu = self.in_features, self.out_features, self.gpu
        x2 = op.reshape(x, [M, K])
        if gpu:
            y = self._forward_gpu(x2, M, K)
        elif self.scheme == "fp32":
            y = op.tensor_ir_op(matmul.dense_fp32(M, K, O), "dense", [x2, self.wp, self.b], placeholder([M, O]))
        else:
            xq, sx = op.tensor_ir_op(matmul.quantize_per_token(M, K), "quantize_per_token", [x2],
                                     [placeholder([M, K], "int8"), placeholder([M, 1])])
            y = op.tensor_ir_op(matmul.dense_w8a8(M, K, O), "dense_w8a8", [xq, sx, self.wp, self.sw],
                                placeholder([M, O]))
            y = op.add(y, self.b)
        return op.reshape(y, lead + [O])

    def _forward_gpu(self, x2, M, K):
        """Plain Relax matmuls (weights K×O) that DLight's GPU rules schedule, fused with the
        epilogue; W8A8 multiplies int8 by int8 into int32 like the CPU kernel."""
        if self.scheme == "fp32":
            return op.add(op.matmul(x2, self.wp), self.b)
        xq, sx = op.tensor_ir_op(matmul.quantize_per_token(M, K, True), "quantize_per_token", [x2],
                                 [placeholder([M, K], "int8"), placeholder([M, 1])])
        acc = op.matmul(xq, self.wp, out_dtype="int32")
        return op.add(op.multiply(op.multiply(op.astype(acc, "float32"), sx), self.sw), self.b)
