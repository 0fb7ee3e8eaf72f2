"""Plain-torch twins of the Triton kernels: same signatures, same results (to rounding).

They are what the dispatcher runs off CUDA, and what the kernel tests compare against.
"""
from __future__ import annotations

import torch

from qlora_kernels.layouts import W4A16Weight
from qlora_quant.nf4 import NF4Tensor, dequantize_nf4


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(t, dtype)


def nf4_matmul(x: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    """x [..., K] @ W^T with W = dequantize(t) [N, K]."""
    return x @ dequantize_nf4(t, x.dtype).t()


def nf4_matmul_grad_input(g: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    """g [..., N] @ W: the input gradient of `nf4_matmul`."""
    return g @ dequantize_nf4(t, g.dtype)


def w4a16_dequantize(w: W4A16Weight) -> torch.Tensor:
    """float32 [K, N] in the kernel's row order (act-order rows already permuted)."""
    K, N = w.in_features, w.out_features
    k = torch.arange(K, device=w.qweight.device)
    n = torch.arange(N, device=w.qweight.device)
    if w.layout == "gptq":
        words = w.qweight[(k // 8)[:, None], n[None, :]]
        q = (words >> ((k % 8) * 4)[:, None]) & 0xF
    else:
        words = w.qweight[k[:, None], (n // 8)[None, :]]
        q = (words >> (4 * ((n % 8) // 2 + 4 * (n % 2)))[None, :]) & 0xF
    g = k // w.group_size
    zwords = w.qzeros[g[:, None], (n // 8)[None, :]]
    zshift = (n % 8) * 4 if w.layout == "gptq" else 4 * ((n % 8) // 2 + 4 * (n % 2))
    z = ((zwords >> zshift[None, :]) & 0xF) + w.zero_offset
    return (q - z).float() * w.scales[g].float()


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    """x [..., K] @ dequantize(w) [K, N] (+ the act-order permutation of x's columns)."""
    if w.perm is not None:
        x = x[..., w.perm]
    return x @ w4a16_dequantize(w).to(x.dtype)
