"""LLM.int8 row-wise quantization against bitsandbytes itself."""
from __future__ import annotations

import pytest
import torch

from qlora_quant.int8 import Int8Rows, dequantize_int8_rows, quantize_int8_rows


@pytest.mark.parametrize("shape", [(64, 128), (3, 7), (257, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codes_and_scales_equal_bitsandbytes(shape, dtype):
    import bitsandbytes as bnb

    w = (torch.randn(shape) * torch.rand(shape[0], 1) * 0.1).to(dtype)
    ours = quantize_int8_rows(w)
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    assert ours.codes.dtype == torch.int8 and ours.absmax.dtype == torch.float32
    assert torch.equal(ours.codes, codes) and torch.equal(ours.absmax, scales)


def test_dequantize_and_zero_rows():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    q = quantize_int8_rows(w)
    assert q.codes.tolist() == [[64, -127, 32], [0, 0, 0]]  # 63.5 rounds half to even
    assert torch.equal(dequantize_int8_rows(q)[1], torch.zeros(3))
    assert dequantize_int8_rows(Int8Rows(q.codes, q.absmax))[0, 1] == -1.0
