"""Low-bit kernels with plain-torch twins, and the dispatcher between them.

Every function below runs the Triton kernel (`qlora_kernels/triton_kernels.py`) when its tensors are
on CUDA and Triton is importable, else the plain-torch twin (`qlora_kernels/reference.py`) of the
same signature. `QLP_KERNELS=torch` forces the twins (to compare, or to work around a kernel);
`QLP_KERNELS=triton` forces the kernels on any device (on the CPU with TRITON_INTERPRET=1:
how the tests run them end to end without a GPU).

    nf4_dequantize(t: NF4Tensor, dtype) -> Tensor [*t.shape] in `dtype`
        NF4 + double-quantized absmax (bitsandbytes layout, quant/nf4.py) to fp16/bf16/fp32;
        the 8-bit absmax codes are decoded inside the kernel.
    nf4_matmul(x [..., K], t: NF4Tensor of shape [N, K]) -> x @ W^T [..., N] in x's dtype
    nf4_matmul_grad_input(g [..., N], t) -> g @ W [..., K]: the input gradient of nf4_matmul.
        Dequantize on the fly tile by tile (no [N, K] float weight in memory) below
        `triton_kernels.NF4_CUBLAS_MIN_M` rows, dequantize once + cuBLAS from there; the
        forward takes a GEMV for M <= `triton_kernels.GEMV_MAX_M` (16); used by
        `qlora_kernels.nf4_linear.LinearNF4` forward and backward (autograd function).
    w4a16_matmul(x [..., K], w: W4A16Weight) -> x @ W [..., N] in x's dtype
        4-bit GPTQ (qweight [K/8, N], v1 or v2 zeros) or AWQ GEMM (qweight [K, N/8]) with
        equal groups of `group_size` rows, any size that divides K (a multiple of 16 keeps
        each K-tile inside one group; any other size reads each row's group). Act-order GPTQ
        is permuted once at load (`kernels.layouts.from_gptq`); the kernel gathers x's columns
        itself. M <= 16: a GEMV (float32 register reduction, split-K), one launch; up to
        `triton_kernels.W4A16_CUBLAS_MIN_M`: a tiled GEMM; from there dequantize + cuBLAS. Used by `qlora_kernels.int4_linear.LinearInt4`.

Precision: accumulation is float32. fp16/bf16 activations multiply fp16/bf16 weights (the
weight rounded once to the activation dtype, as the twin does); float32 activations are
multiplied at full float32 precision, never TF32. Under autocast, `custom_fwd`/`custom_bwd`
below make an autograd function run its kernels in the autocast dtype.

Requirements: contiguous packed tensors as the checkpoints store them. What the kernels cannot
take is run by the twin: activations other than fp16/bf16/fp32, 2/3/8-bit GPTQ, unequal
groups, NF4 block sizes outside quant.nf4.ALLOWED_BLOCKSIZES.
"""
from __future__ import annotations

import functools
import os

import torch

from qlora_kernels import reference
from qlora_kernels.layouts import W4A16Weight, from_awq, from_gptq

__all__ = ["nf4_dequantize", "nf4_matmul", "nf4_matmul_grad_input", "w4a16_matmul", "W4A16Weight", "from_gptq",
           "from_awq", "triton_available", "use_triton", "custom_fwd", "custom_bwd"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("QLP_KERNELS", "auto")
    return (mode == "triton" or (t.is_cuda and mode != "torch")) and triton_available()


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _impl(t: torch.Tensor):
    """The kernels for a tensor they can take (fp16/bf16/fp32 activations), else the twins."""
    if use_triton(t) and (t.dtype in _KERNEL_DTYPES or not t.is_floating_point()):
        from qlora_kernels import triton_kernels

        return triton_kernels
    return reference


def _nf4_impl(x: torch.Tensor, t):
    """The kernels tile by powers of two inside a block: a block size outside quant.nf4's
    ALLOWED_BLOCKSIZES (possible in a foreign checkpoint) goes to the twin."""
    from qlora_quant.nf4 import ALLOWED_BLOCKSIZES

    return _impl(x) if t.blocksize in ALLOWED_BLOCKSIZES else reference


def nf4_dequantize(t, dtype: torch.dtype) -> torch.Tensor:
    return _nf4_impl(t.packed, t).nf4_dequantize(t, dtype)


def nf4_matmul(x: torch.Tensor, t) -> torch.Tensor:
    return _nf4_impl(x, t).nf4_matmul(x, t)


def nf4_matmul_grad_input(g: torch.Tensor, t) -> torch.Tensor:
    return _nf4_impl(g, t).nf4_matmul_grad_input(g, t)


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    return _impl(x).w4a16_matmul(x, w)


def custom_fwd(fwd):
    """`torch.amp.custom_fwd` for an autograd function's forward whose kernels autocast does not
    see, with `cast_inputs` = the autocast dtype of the moment, on the device of the first
    tensor argument. Under autocast, floating-point tensor inputs are cast to that dtype (float32
    activations would otherwise take the float32 kernel and return float32) and the body runs
    with autocast off (the twins' matmuls are then computed in that dtype, not recast);
    outside autocast it changes nothing. Pair with `custom_bwd`."""

    @functools.wraps(fwd)
    def forward(ctx, *args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cuda")
        ctx._autocast_device_type = device_type
        cast = torch.get_autocast_dtype(device_type)
        return torch.amp.custom_fwd(fwd, device_type=device_type, cast_inputs=cast)(ctx, *args, **kwargs)

    return forward


def custom_bwd(bwd):
    """`torch.amp.custom_bwd` on the device `custom_fwd` saw: the backward runs in the autocast
    state of the forward (with cast inputs: autocast off, the gradients in the autocast dtype;
    autograd casts the input gradient back to the input's dtype)."""

    @functools.wraps(bwd)
    def backward(ctx, *args):
        return torch.amp.custom_bwd(bwd, device_type=ctx._autocast_device_type)(ctx, *args)

    return backward
