"""GPTQ packing against hand-computed words, and round trips."""
from __future__ import annotations

import pytest
import torch

from qlora_kernels.int4_linear import LinearInt4
from qlora_quant.packing import (dequantize_awq, dequantize_gptq, pack_along_rows, pack_awq, pack_gptq,
                                 unpack_along_rows, unpack_gptq)


def test_hand_computed_words():
    # Input rows 0..7 of one output column, LSB first: 0x76543210.
    assert pack_along_rows(torch.arange(8).view(8, 1), 4).item() & 0xFFFFFFFF == 0x76543210
    # All 15: every bit set, the int32 is -1.
    assert pack_along_rows(torch.full((8, 1), 15), 4).item() == -1
    # 2-bit: rows 0..15 holding 3,0,0,...: 0x00000003; 8-bit: 1,2,3,4 -> 0x04030201.
    assert pack_along_rows(torch.tensor([3] + [0] * 15).view(16, 1), 2).item() == 3
    assert pack_along_rows(torch.tensor([1, 2, 3, 4]).view(4, 1), 8).item() == 0x04030201


def test_symmetric_zeros_in_v1_are_0x77777777():
    codes = torch.randint(0, 16, (16, 64))
    packed = pack_gptq(codes, torch.full((2, 16), 8), torch.rand(2, 16), torch.arange(64) // 32, bits=4)
    assert (packed.qzeros & 0xFFFFFFFF == 0x77777777).all()
    assert packed.qweight.shape == (8, 16) and packed.qzeros.shape == (2, 2) and packed.scales.dtype == torch.float16


def test_three_bit_layout_splits_values_10_and_21_across_words():
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10, 0] = 0b101  # bits 30..32: low two bits end word 0, high bit starts word 1
    values[21, 0] = 0b011  # bits 63..65: low bit ends word 1, high two bits start word 2
    values[31, 0] = 0b111  # bits 93..95: top of word 2
    words = pack_along_rows(values, 3).view(-1).to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [0b01 << 30, (1 << 0) | (1 << 31), 0b01 | (0b111 << 29)]
    assert torch.equal(unpack_along_rows(pack_along_rows(values, 3), 3), values.int())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("v1", [True, False])
def test_round_trip(bits, v1):
    out_f, in_f, gs = 32, 128, 32
    codes = torch.randint(0, 2**bits, (out_f, in_f))
    zeros = torch.randint(1 if v1 else 0, 2**bits, (in_f // gs, out_f))
    g_idx = torch.randperm(in_f) // gs
    packed = pack_gptq(codes, zeros, torch.rand(in_f // gs, out_f), g_idx, bits, v1=v1)
    c, z = unpack_gptq(packed, bits, v1=v1)
    assert torch.equal(c, codes.int()) and torch.equal(z, zeros.int())
    assert torch.equal(unpack_along_rows(pack_along_rows(codes, bits), bits), codes.int())


def test_v1_refuses_a_zero_point_of_zero():
    with pytest.raises(ValueError, match="v2"):
        pack_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(1, 8), torch.ones(1, 8), torch.zeros(8), 4, v1=True)


def test_linear_int4_dequantizes_scales_times_codes_minus_zeros():
    out_f, in_f, gs = 16, 64, 32
    codes = torch.randint(0, 16, (out_f, in_f))
    zeros = torch.randint(1, 16, (2, out_f))
    scales = torch.rand(2, out_f).half().float()
    g_idx = torch.randperm(in_f) // gs  # act-order: not monotonic
    layer = LinearInt4.from_gptq(pack_gptq(codes, zeros, scales, g_idx, 4), bits=4, v1=True)
    expected = scales[g_idx].t() * (codes - zeros[g_idx].t())
    assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.randn(3, in_f)
    torch.testing.assert_close(layer(x), x @ expected.t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_helpers_stay_on_the_data_device(bits):
    """Every helper tensor is made on the data's device: on the meta device (standing in for
    CUDA, which a CPU-made index or shift tensor fails against) pack, unpack and dequantize
    run for both layouts. Found on a GPU: AWQ's torch path raised "found at least two devices"."""
    out_f, in_f, g = 32, 64, 32
    codes = torch.zeros(out_f, in_f, dtype=torch.int32, device="meta")
    zeros = torch.ones(in_f // g, out_f, dtype=torch.int32, device="meta")
    scales = torch.ones(in_f // g, out_f, device="meta")
    g_idx = torch.zeros(in_f, dtype=torch.int32, device="meta")
    p = pack_gptq(codes, zeros, scales, g_idx, bits, v1=False)
    assert p.qweight.device.type == "meta"
    assert dequantize_gptq(p, bits, v1=False).shape == (out_f, in_f)
    if bits == 4:
        a = pack_awq(codes, zeros, scales)
        assert dequantize_awq(a).shape == (out_f, in_f) and dequantize_awq(a).device.type == "meta"


def test_awq_repacked_into_the_gptq_layout_keeps_every_value():
    """AWQ GEMM (N-packed, interleaved nibbles) -> GPTQ v2 (K-packed): the loader's conversion."""
    from qlora_quant.packing import AWQPacked, gptq_from_awq

    out_f, in_f, gs = 24, 96, 32
    codes = torch.randint(0, 16, (out_f, in_f))
    zeros = torch.randint(0, 16, (in_f // gs, out_f))  # zero points of 0 included: v2 stores them
    zeros[0, 0] = 0
    scales = torch.rand(in_f // gs, out_f).half().float()
    awq = pack_awq(codes, zeros, scales)
    gptq = gptq_from_awq(awq)
    assert gptq.qweight.shape == (in_f // 8, out_f) and gptq.qzeros.shape == (in_f // gs, out_f // 8)
    assert torch.equal(gptq.g_idx, (torch.arange(in_f) // gs).int())
    unpacked_codes, unpacked_zeros = unpack_gptq(gptq, 4, v1=False)
    assert torch.equal(unpacked_codes, codes) and torch.equal(unpacked_zeros, zeros)
    assert torch.equal(dequantize_gptq(gptq, 4, v1=False), dequantize_awq(awq))

    repacked, native = LinearInt4.from_awq(awq), LinearInt4.from_awq(AWQPacked(*awq), repack=False)
    assert (repacked.layout, repacked.source_format, native.layout) == ("gptq", "awq-gemm", "awq")
    assert "awq-gemm" in repr(repacked)
    x = torch.randn(5, in_f)
    assert torch.equal(repacked(x), native(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("order", ["consecutive", "act-order", "uneven"])
def test_dequantize_is_the_plain_formula_bit_for_bit(bits, order):
    """The broadcast (consecutive groups) and gather (act-order) dequantizations give exactly
    the bits of the plain formula scales[g_idx] * (q - zeros[g_idx]), in float32."""
    gen = torch.Generator().manual_seed(bits)
    out_f, in_f, gs = 64, 96, 32  # 3-bit zeros fill whole words along out at 32
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen)
    g_idx = torch.arange(in_f) // gs
    if order == "act-order":
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    elif order == "uneven":  # groups of unequal size: not the consecutive layout either
        g_idx = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(26, dtype=torch.long), torch.full((30,), 2)])
    zeros = torch.randint(1, 2**bits, (3, out_f), generator=gen)
    scales = (torch.rand(3, out_f, generator=gen) + 0.01).half()
    plain = scales.float()[g_idx].t() * (codes.float() - zeros.float()[g_idx].t())
    for v1 in (True, False):
        got = dequantize_gptq(pack_gptq(codes, zeros, scales, g_idx, bits, v1=v1), bits, v1=v1)
        assert got.is_contiguous() and torch.equal(got, plain)
    if bits == 4 and order == "consecutive":
        assert torch.equal(dequantize_awq(pack_awq(codes, zeros, scales)), plain)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("order", ["consecutive", "act-order"])
def test_dequantize_in_row_blocks_and_in_the_target_dtype(bits, order, monkeypatch):
    """Dequantizing a few output rows at a time (blocks of 5 rows here, the last one short) and
    writing the target dtype directly give the bits of the whole-matrix float32 formula, rounded
    to that dtype."""
    gen = torch.Generator().manual_seed(7)
    out_f, in_f, gs = 64, 96, 32
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen)
    g_idx = torch.arange(in_f) // gs
    if order == "act-order":
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    zeros = torch.randint(1, 2**bits, (3, out_f), generator=gen)
    scales = (torch.rand(3, out_f, generator=gen) + 0.01).half()
    plain = scales.float()[g_idx].t() * (codes.float() - zeros.float()[g_idx].t())
    packed = pack_gptq(codes, zeros, scales, g_idx, bits, v1=False)
    monkeypatch.setattr("qlora_quant.packing.DEQUANT_CHUNK_VALUES", 5 * in_f)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = dequantize_gptq(packed, bits, v1=False, dtype=dtype)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, plain.to(dtype))
