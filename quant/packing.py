"""Packing integer codes into the standard checkpoint layouts, and unpacking them.

GPTQ (QUANT_SPEC.md D, AutoGPTQ layout): `qweight` int32 [in * bits / 32, out] packed along
the input dimension, LSB first; `qzeros` int32 [groups, out * bits / 32] packed along the
output dimension; `scales` float16 [groups, out]; `g_idx` int32 [in]. Format "gptq" (v1)
stores zero - 1; "gptq_v2" stores the true zero. 2-, 4- and 8-bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["GPTQPacked", "pack_gptq", "unpack_gptq", "v1_would_corrupt", "pack_along_rows", "unpack_along_rows"]

PACKABLE_BITS = (2, 4, 8)


class GPTQPacked(NamedTuple):
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def _check_bits(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"packing supports {PACKABLE_BITS}-bit codes, got {bits}")
    return 32 // bits


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes in [0, 2^bits) -> int32 [R * bits / 32, C]; row r*pf + j at bits [bits*j, bits*(j+1))."""
    pf = _check_bits(bits)
    rows, cols = values.shape
    if rows % pf:
        raise ValueError(f"{rows} rows cannot be packed {pf} to an int32 word")
    v = values.to(torch.int64).reshape(rows // pf, pf, cols)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    words = (v << shifts).sum(dim=1)  # < 2^32, exact in int64
    return words.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else _to_int32(words)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_along_rows`: int32 [R / pf, C] -> int32 [R, C] codes."""
    pf = _check_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    codes = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, words.shape[1]).to(torch.int32)


def v1_would_corrupt(zeros: torch.Tensor) -> bool:
    """v1 stores zero - 1: a zero of 0 would become -1 and corrupt its word."""
    return bool((zeros == 0).any())


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              v1: bool = True) -> GPTQPacked:
    """Pack a quantized linear into the GPTQ layout.

    Args:
        codes: int [out, in], integer codes in [0, 2^bits).
        zeros: int [groups, out], true zero points.
        scales: float [groups, out].
        g_idx: int [in], group of each input column.
        v1: store zero - 1 ("gptq" format); else the true zeros ("gptq_v2").
    """
    if v1 and v1_would_corrupt(zeros):
        raise ValueError("a zero point of 0 cannot be stored in the v1 format (zero - 1); use v2")
    stored_zeros = zeros.to(torch.int64) - (1 if v1 else 0)
    return GPTQPacked(
        qweight=pack_along_rows(codes.t().contiguous(), bits),
        qzeros=pack_along_rows(stored_zeros.t().contiguous(), bits).t().contiguous(),
        scales=scales.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
    )


def unpack_gptq(p: GPTQPacked, bits: int, v1: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 [out, in], true zeros int32 [groups, out]) of a GPTQ-packed linear."""
    codes = unpack_along_rows(p.qweight, bits).t()
    zeros = unpack_along_rows(p.qzeros.t().contiguous(), bits).t() + (1 if v1 else 0)
    return codes.contiguous(), zeros.contiguous()
