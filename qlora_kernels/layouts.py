"""The packed int4 weight as the W4A16 kernels read it, prepared once at load time.

`from_awq` takes AWQ GEMM's own words (the kernels read that layout too; the benchmark times
it as the baseline), but `LinearInt4.from_awq` repacks AWQ checkpoints into the GPTQ layout at
load (`qlora_quant.packing.gptq_from_awq`), which the kernels read faster. GPTQ without
act-order keeps its words. A GPTQ act-order checkpoint (g_idx not equal to k // group_size) is
reordered once: rows sorted by group (`perm = argsort(g_idx)`), so the kernel sees consecutive groups
and every call only permutes the activation columns: the Triton kernel reads x through `perm`
(no separate gather), the twin computes `x[:, perm]`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from qlora_quant.packing import AWQPacked, GPTQPacked, pack_along_rows, unpack_along_rows


class W4A16Weight(NamedTuple):
    layout: str  # "gptq": qweight [K/8, N], K-packed | "awq": qweight [K, N/8], interleaved N-packed
    qweight: torch.Tensor  # int32
    qzeros: torch.Tensor  # int32 [K / group_size, N/8] (GPTQ: plain nibble order; AWQ: interleaved)
    scales: torch.Tensor  # float16 [K / group_size, N]
    group_size: int
    zero_offset: int  # 1 for GPTQ v1 (stores zero - 1), else 0
    perm: Optional[torch.Tensor]  # int64 [K] activation column order, or None
    in_features: int
    out_features: int


def from_gptq(p: GPTQPacked, bits: int, v1: bool) -> Optional[W4A16Weight]:
    """None when the kernels cannot take it (bits other than 4, or groups of unequal size)."""
    if bits != 4:
        return None
    K, N = p.g_idx.numel(), p.scales.shape[1]
    n_groups = p.scales.shape[0]
    if K % n_groups:
        return None
    gs = K // n_groups
    g_idx = p.g_idx.long()
    perm = None
    qweight = p.qweight
    if not torch.equal(g_idx, torch.arange(K, device=g_idx.device) // gs):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K, device=g_idx.device) // gs):
            return None
        codes = unpack_along_rows(p.qweight.cpu(), 4)[perm.cpu()]
        qweight = pack_along_rows(codes, 4).to(p.qweight.device)
    return W4A16Weight("gptq", qweight.contiguous(), p.qzeros.contiguous(), p.scales.contiguous(), gs,
                       1 if v1 else 0, perm, K, N)


def from_awq(p: AWQPacked) -> W4A16Weight:
    K, N = p.qweight.shape[0], p.scales.shape[1]
    return W4A16Weight("awq", p.qweight.contiguous(), p.qzeros.contiguous(), p.scales.contiguous(),
                       K // p.scales.shape[0], 0, None, K, N)
