"""Packing integer codes into the standard checkpoint layouts, and unpacking them.

GPTQ (docs/formats.md#gptq-checkpoint-layout, AutoGPTQ layout): `qweight` int32 [in * bits / 32, out] packed along
the input dimension, LSB first; `qzeros` int32 [groups, out * bits / 32] packed along the
output dimension; `scales` float16 [groups, out]; `g_idx` int32 [in]. Format "gptq" (v1)
stores zero - 1; "gptq_v2" stores the true zero. 2-, 3-, 4- and 8-bit.

Every width is the same little-endian bit stream: in each run of 32 values along the packed
dimension, value k occupies bits [bits*k, bits*(k+1)) of `bits` consecutive int32 words. For
2/4/8 bits no value crosses a word; for 3 bits values 10 and 21 straddle two words (the
10 | 1 | 10 | 1 | 10 layout of AutoGPTQ).

AWQ GEMM (AutoAWQ layout, 4-bit only): `qweight` int32 [in, out / 8] and `qzeros` int32
[groups, out / 8] packed along the *output* dimension in the interleaved nibble order
0 2 4 6 1 3 5 7, true zeros, `scales` float16 [groups, out]; group of input row k is k // g.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["GPTQPacked", "pack_gptq", "unpack_gptq", "dequantize_gptq", "v1_would_corrupt", "pack_along_rows",
           "unpack_along_rows", "AWQPacked", "pack_awq", "unpack_awq", "dequantize_awq"]

PACKABLE_BITS = (2, 3, 4, 8)


class GPTQPacked(NamedTuple):
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"packing supports {PACKABLE_BITS}-bit codes, got {bits}")


def _positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift of each of the 32 values of a run (on the data's device: the
    helpers below run on CUDA tensors too, e.g. the torch path of a quantized layer)."""
    offsets = torch.arange(32, dtype=torch.int64, device=device) * bits
    return offsets // 32, offsets % 32


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes in [0, 2^bits) -> int32 [R * bits / 32, C], packed along the rows."""
    _check_bits(bits)
    rows, cols = values.shape
    if rows % 32 and (rows * bits) % 32:
        raise ValueError(f"{rows} rows of {bits}-bit codes do not fill whole int32 words")
    if 32 % bits == 0:  # 2/4/8 bits: each word holds 32 / bits whole values, lowest rows in the low bits
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device).view(1, per, 1)
        words = (values.to(torch.int64).reshape(rows // per, per, cols) << shifts).sum(dim=1)  # disjoint bits: OR
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    if rows % 32:  # 3 bits with fewer than 32 rows: pad to a whole run, drop the unused words
        padded = torch.zeros(((rows + 31) // 32) * 32, cols, dtype=values.dtype, device=values.device)
        padded[:rows] = values
        return pack_along_rows(padded, bits)[: rows * bits // 32]
    v = values.to(torch.int64).reshape(rows // 32, 32, cols)
    word, shift = _positions(bits, values.device)
    shifted = v << shift.view(1, 32, 1)  # < 2^35, exact in int64
    words = torch.zeros(rows // 32, bits + 1, cols, dtype=torch.int64, device=values.device)
    words.index_add_(1, word, shifted & 0xFFFFFFFF)
    words.index_add_(1, word + 1, shifted >> 32)  # the part that crosses into the next word
    words = words[:, :bits].reshape(-1, cols)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_along_rows`: int32 [R * bits / 32, C] -> int32 [R, C] codes."""
    _check_bits(bits)
    n_words, cols = words.shape
    rows = n_words * 32 // bits
    if 32 % bits == 0:  # 2/4/8 bits: no value crosses a word; one shift per value, on int32
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, -1, 1)
        codes = (words.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)  # the sign bits are masked off
        return codes.reshape(rows, cols)
    if n_words % bits:
        padded = torch.zeros(((n_words + bits - 1) // bits) * bits, cols, dtype=words.dtype, device=words.device)
        padded[:n_words] = words
        return unpack_along_rows(padded, bits)[:rows]
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, bits, cols)
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    word, shift = _positions(bits, words.device)
    pair = w[:, word] | (w[:, word + 1] << 32)  # 64 bits around each value
    codes = (pair >> shift.view(1, 32, 1)) & (2**bits - 1)
    return codes.reshape(-1, cols).to(torch.int32)


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


# Output rows dequantized per step: about 2M values, so each step's temporaries (codes, their
# float32 copy) stay a few MB. glibc serves allocations above 32 MB with fresh mmap pages that
# the kernel faults in and zeroes on first touch; unchunked, a Llama-3-8B gate_proj made ~1.5 GB
# of such pages per call, and past the kept budget an 8B evaluation spent as much CPU time
# faulting pages as computing (scripts/bench_quantized_eval.py). Small temporaries are reused from
# the heap instead.
DEQUANT_CHUNK_VALUES = 1 << 21


def dequantize_gptq(p: GPTQPacked, bits: int, v1: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weight of a GPTQ-packed linear in `dtype`: scales[g_idx] * (q - zero[g_idx]),
    computed in float32 and then rounded to `dtype` (the same bits as `.to(dtype)` of the float32
    weight), a block of output rows at a time."""
    zeros = unpack_along_rows(p.qzeros.t().contiguous(), bits).t() + (1 if v1 else 0)  # int32 [groups, out]
    in_f, out_f, groups = p.g_idx.numel(), p.scales.shape[1], p.scales.shape[0]
    g = p.g_idx.long()
    consecutive = (in_f % groups == 0 and g.device.type != "meta"  # meta: no values to compare
                   and torch.equal(g, torch.arange(in_f, device=g.device) // (in_f // groups)))
    zt, st = zeros.t().float().contiguous(), p.scales.t().float().contiguous()  # [out, groups]

    def rows(r0: int, r1: int) -> torch.Tensor:  # float32 [r1 - r0, in]
        codes = unpack_along_rows(p.qweight[:, r0:r1], bits).t().contiguous()  # int32 [rows, in]
        if consecutive:  # no act-order, or AWQ repacked
            return _dequantize_consecutive(codes, zt[r0:r1], st[r0:r1])
        return (codes.float() - zt[r0:r1].index_select(1, g)).mul_(st[r0:r1].index_select(1, g))

    step = max(1, DEQUANT_CHUNK_VALUES // max(in_f, 1))
    if out_f <= step:  # one block: no separate output to copy into
        return rows(0, out_f).to(dtype)
    out = torch.empty(out_f, in_f, dtype=dtype, device=p.qweight.device)
    for r0 in range(0, out_f, step):
        out[r0:r0 + step].copy_(rows(r0, min(out_f, r0 + step)))
    return out


def _dequantize_consecutive(codes: torch.Tensor, zeros_t: torch.Tensor, scales_t: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] = (q - z) * s with group k // g of input column k: each group's zero and
    scale ([out, groups], float32) broadcast over its columns.

    Like the act-order gather above it computes elementwise in float32 exactly as written, so
    the bits do not depend on the layout; both work on contiguous [out, in] rows. The
    transposed gathers they replaced were 3.1-9.1x slower on the CPU (scripts/bench_dequantize.py,
    benchmarks/dequantize_cpu.json),
    where an int4 layer dequantizes at every call once past the kept budget (qlora_kernels/int4_linear.py)."""
    out_f, in_f = codes.shape
    groups = scales_t.shape[1]
    w = codes.reshape(out_f, groups, in_f // groups).float() - zeros_t.unsqueeze(2)
    return w.mul_(scales_t.unsqueeze(2)).view(out_f, in_f)


# AWQ GEMM (docs/formats.md#awq-gemm-layout, AutoAWQ `gemm.py`): 4-bit only, packed along the *output*
# dimension; nibble i of word column c holds output column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble that holds output column 8c + j


class AWQPacked(NamedTuple):
    qweight: torch.Tensor  # int32 [in, out / 8]
    qzeros: torch.Tensor  # int32 [in / g, out / 8], true zero points
    scales: torch.Tensor  # float16 [in / g, out]


def _pack_awq_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> int32 [R, C / 8] in the interleaved AWQ nibble order."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 output columns, got {cols}")
    shifts = 4 * torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int64, device=values.device)  # column j's nibble
    words = (values.to(torch.int64).reshape(rows, cols // 8, 8) << shifts).sum(dim=2)  # disjoint bits: OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_awq_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_awq_columns`: int32 [R, C / 8] -> int32 [R, C]."""
    shifts = 4 * torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32, device=words.device)  # column j's nibble
    nibbles = (words.to(torch.int32).unsqueeze(2) >> shifts) & 0xF  # the sign bits are masked off
    return nibbles.reshape(words.shape[0], -1)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> AWQPacked:
    """Pack a 4-bit linear with consecutive groups into the AWQ GEMM layout.

    Args:
        codes: int [out, in], codes in [0, 16).
        zeros: int [groups, out], true zero points.
        scales: float [groups, out].
    """
    return AWQPacked(
        qweight=_pack_awq_columns(codes.t().contiguous()),
        qzeros=_pack_awq_columns(zeros),
        scales=scales.to(torch.float16).contiguous(),
    )


def unpack_awq(p: AWQPacked) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 [out, in], zeros int32 [groups, out]) of an AWQ-GEMM-packed linear."""
    return _unpack_awq_columns(p.qweight).t().contiguous(), _unpack_awq_columns(p.qzeros)


def dequantize_awq(p: AWQPacked) -> torch.Tensor:
    """float32 [out, in] weight: (q - zero[k // g]) * scale[k // g]."""
    codes, zeros = unpack_awq(p)
    return _dequantize_consecutive(codes, zeros.t().float(), p.scales.t().float())


def gptq_from_awq(p: AWQPacked) -> GPTQPacked:
    """The same 4-bit weights in the GPTQ layout (codes packed along the input rows, zeros in
    plain nibble order, true zeros as "gptq_v2", groups in order): every value unchanged, so
    `dequantize_gptq(gptq_from_awq(p), 4, v1=False)` equals `dequantize_awq(p)` exactly."""
    codes, zeros = unpack_awq(p)
    in_f = codes.shape[1]
    g_idx = torch.arange(in_f, device=codes.device) // (in_f // p.scales.shape[0])
    return pack_gptq(codes, zeros, p.scales, g_idx, 4, v1=False)
