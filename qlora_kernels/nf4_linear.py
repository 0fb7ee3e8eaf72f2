"""`LinearNF4`: a linear layer whose frozen weight is stored in NF4 with double quantization.

Compute goes through `kernels`: on CUDA the Triton kernels dequantize tile by tile inside the
matmul (forward and input gradient); elsewhere their plain-torch twins (dequantize, matmul),
and at inference on the CPU the dequantized weight is kept after the first call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import qlora_kernels as kernels
from qlora_kernels.int4_linear import inference_weight, keep_for_training, kept_weight
from qlora_quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in the forward and again in the backward.

    Saving only a reference to the layer (not the dequantized W) keeps the activation memory
    of QLoRA training at the size of the NF4 weights; the weight itself gets no gradient.
    On the torch path inside `training_weights(layers)` the dequantized W is kept on the layer
    between calls: the twins' arithmetic on the same values, so the same results.
    """

    @staticmethod
    @kernels.custom_fwd
    def forward(ctx, x: torch.Tensor, layer: "LinearNF4") -> torch.Tensor:
        ctx.layer = layer
        if keep_for_training() and not kernels.use_triton(x):
            return x @ kept_weight(layer, x.dtype).t()  # = reference.nf4_matmul
        return kernels.nf4_matmul(x, layer.nf4())

    @staticmethod
    @kernels.custom_bwd
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        if keep_for_training() and not kernels.use_triton(grad_out):
            return grad_out @ kept_weight(layer, grad_out.dtype), None  # = reference.nf4_matmul_grad_input
        return kernels.nf4_matmul_grad_input(grad_out, layer.nf4()), None


class LinearNF4(nn.Module):
    """y = x @ dequantize(W)^T + b, with W held as an `NF4Tensor` in buffers (frozen).

    Args:
        weight: the quantized weight, shape [out_features, in_features].
        bias: optional float bias [out_features].
    """

    def __init__(self, weight: NF4Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"LinearNF4 needs a 2-D weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        # `weight` holds the packed uint8 nibbles, as in bitsandbytes' Linear4bit (and where peft
        # looks for the device of a base layer).
        self.register_buffer("weight", weight.packed)
        self.register_buffer("qabsmax", weight.qabsmax)
        self.register_buffer("nested_absmax", weight.nested_absmax)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("code", weight.code)
        self.register_buffer("nested_code", weight.nested_code)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, dtype: Optional[torch.dtype] = None) -> "LinearNF4":
        w = linear.weight.detach()
        w = w.to(dtype) if dtype is not None else w
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(quantize_nf4(w, blocksize), bias)

    def nf4(self) -> NF4Tensor:
        return NF4Tensor(
            packed=self.weight, qabsmax=self.qabsmax, nested_absmax=self.nested_absmax, offset=self.offset,
            code=self.code, nested_code=self.nested_code, shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype, blocksize=self.blocksize,
        )

    def weight_key(self) -> tuple:
        return (self.weight.device, self.weight.data_ptr())

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nf4(self.nf4(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = _NF4Matmul.apply(x, self)
        elif kernels.use_triton(x):
            y = kernels.nf4_matmul(x, self.nf4())
        else:
            y = x @ inference_weight(self, x.dtype).t()
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, nf4+dq"
