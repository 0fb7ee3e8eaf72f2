"""`LinearInt4`: a linear layer loaded from a packed GPTQ checkpoint, computed as it ships.

Plain-torch compute: unpack and dequantize the weight (`scales[g_idx] * (q - zero[g_idx])`),
then matmul; the Triton W4A16 kernels of `kernels/` take over on CUDA once they exist.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from quant.packing import GPTQPacked, dequantize_gptq


class LinearInt4(nn.Module):
    """y = x @ W^T + b with W stored in the GPTQ layout (2/4/8-bit; act-order via g_idx).

    Args:
        packed: qweight, qzeros, scales, g_idx as in the checkpoint.
        bits: code width.
        v1: the checkpoint stores zero - 1 (format "gptq") rather than the true zero ("gptq_v2").
    """

    def __init__(self, packed: GPTQPacked, bits: int, v1: bool, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.bits, self.v1 = bits, v1
        self.in_features = packed.g_idx.numel()
        self.out_features = packed.scales.shape[1]
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("qzeros", packed.qzeros)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("g_idx", packed.g_idx)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = GPTQPacked(self.qweight, self.qzeros, self.scales, self.g_idx)
        return dequantize_gptq(packed, self.bits, self.v1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, gptq{'' if self.v1 else '_v2'}"
