"""Low-bit kernels with plain-torch twins, and the dispatcher between them.

Every function below runs the Triton kernel (`kernels/triton_kernels.py`) when its tensors are
on CUDA and Triton is importable, else the plain-torch twin (`kernels/reference.py`) of the
same signature. `QLP_KERNELS=torch` forces the twins (to compare, or to work around a kernel);
`QLP_KERNELS=triton` forces the kernels on any device (on the CPU with TRITON_INTERPRET=1:
how the tests run them end to end without a GPU).

    nf4_dequantize(t: NF4Tensor, dtype) -> Tensor [*t.shape] in `dtype`
        NF4 + double-quantized absmax (bitsandbytes layout, quant/nf4.py) to fp16/bf16/fp32;
        the 8-bit absmax codes are decoded inside the kernel.
    nf4_matmul(x [..., K], t: NF4Tensor of shape [N, K]) -> x @ W^T [..., N] in x's dtype
    nf4_matmul_grad_input(g [..., N], t) -> g @ W [..., K]: the input gradient of nf4_matmul.
        Dequantize on the fly tile by tile (no [N, K] float weight in memory); used by
        `quant.nf4_linear.LinearNF4` forward and backward (autograd function).
    w4a16_matmul(x [..., K], w: W4A16Weight) -> x @ W [..., N] in x's dtype
        4-bit GPTQ (qweight [K/8, N], v1 or v2 zeros) or AWQ GEMM (qweight [K, N/8]) with
        equal groups of `group_size` rows (any size that divides K; a multiple of 16 uses
        K-tiles inside one group). Act-order GPTQ is permuted once at load
        (`kernels.layouts.from_gptq`); each call permutes x's columns. M <= 16 takes a
        split-K path (fp32 atomics), larger M a tiled GEMM. Used by `quant.int4_linear.LinearInt4`.

Requirements: contiguous packed tensors as the checkpoints store them; x of any float dtype
(accumulation is float32). Weights the kernels cannot take (2/3/8-bit GPTQ, unequal groups)
are run by the twin.
"""
from __future__ import annotations

import os

import torch

from kernels import reference
from kernels.layouts import W4A16Weight, from_awq, from_gptq

__all__ = ["nf4_dequantize", "nf4_matmul", "nf4_matmul_grad_input", "w4a16_matmul", "W4A16Weight", "from_gptq",
           "from_awq", "triton_available", "use_triton"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("QLP_KERNELS", "auto")
    return (mode == "triton" or (t.is_cuda and mode != "torch")) and triton_available()


def _impl(t: torch.Tensor):
    if use_triton(t):
        from kernels import triton_kernels

        return triton_kernels
    return reference


def nf4_dequantize(t, dtype: torch.dtype) -> torch.Tensor:
    return _impl(t.packed).nf4_dequantize(t, dtype)


def nf4_matmul(x: torch.Tensor, t) -> torch.Tensor:
    return _impl(x).nf4_matmul(x, t)


def nf4_matmul_grad_input(g: torch.Tensor, t) -> torch.Tensor:
    return _impl(g).nf4_matmul_grad_input(g, t)


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    return _impl(x).w4a16_matmul(x, w)
