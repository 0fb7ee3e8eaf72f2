"""LLM.int8 weights (Dettmers et al. 2022; bitsandbytes `Int8Params`): int8 codes with one
absmax scale per output row, bit for bit what bitsandbytes stores.

bitsandbytes quantizes the float16 weight: SCB = max |W[r, :]| (float32), CB = round(W * 127 /
SCB) (float32 arithmetic, rounding half to even). At inference it also quantizes each
activation row to int8 and computes the columns holding an activation above its threshold
(6.0) in float16 (the outlier decomposition); that is runtime, not stored.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Int8Rows(NamedTuple):
    """codes: int8 [out, in]; absmax: float32 [out] (bitsandbytes' `weight` and `SCB`)."""

    codes: torch.Tensor
    absmax: torch.Tensor


def quantize_int8_rows(weight: torch.Tensor) -> Int8Rows:
    """Row-wise absmax int8 of a 2-D weight, from its float16 values as bitsandbytes does. A row
    of zeros gets codes 0 (bitsandbytes would divide by zero)."""
    w = weight.to(torch.float16)
    absmax = w.abs().amax(dim=1).float()
    codes = torch.round(w * (127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)).unsqueeze(-1))
    return Int8Rows(codes.to(torch.int8), absmax)


def dequantize_int8_rows(q: Int8Rows) -> torch.Tensor:
    """The float32 weight the codes stand for: codes * absmax / 127."""
    return q.codes.float() * (q.absmax / 127.0).unsqueeze(-1)
