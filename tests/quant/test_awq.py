"""AWQ math (quant/awq.py) and the AWQ GEMM packing, against direct computations of the spec."""
from __future__ import annotations

import pytest
import torch

from qlora_quant.awq import (
    candidate_scales, clip_weight, gram_blocks, linear_loss_from_hessian, linear_loss_from_inputs, pseudo_quantize,
    scaled_gram_blocks, scaled_gram_blocks_from_inputs, scaled_quantized,
    search_clip, search_scales, weight_channel_mean,
)
from qlora_quant.gptq import rtn_quantize
from qlora_quant.packing import AWQ_ORDER, AWQPacked, dequantize_awq, pack_awq, unpack_awq


def _inputs_with_outlier_channels(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :: max(1, d // 8)] *= 20  # a few salient channels, as in real LLM activations
    return x


@pytest.mark.parametrize("shape,gs", [((16, 64), 32), ((7, 128), 64), ((5, 96), -1)])
def test_pseudo_quantize_is_the_packed_round_to_nearest(shape, gs):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pseudo_quantize(W, 4, gs), rtn_quantize(W, 4, gs, sym=False, scale_dtype=torch.float16).Q)


def test_weight_channel_mean_is_autoawq_duo_statistic():
    a, b = torch.randn(8, 64), torch.randn(4, 64)
    W = torch.cat([a, b]).abs().reshape(12, 2, 32)
    expected = (W / (W.amax(dim=2, keepdim=True) + 1e-6)).reshape(12, 64).mean(dim=0)
    assert torch.allclose(weight_channel_mean([a, b], 32), expected)


def test_candidate_scales_are_normalized_and_ratio_zero_is_flat_without_duo():
    x_mean = torch.rand(64) * 10 + 0.01
    for ratio in (0.0, 0.35, 0.95):
        s = candidate_scales(x_mean, torch.rand(64) + 0.1, ratio)
        assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    assert torch.allclose(candidate_scales(x_mean, None, 0.0), torch.ones(64))


def test_search_scales_returns_the_grid_argmin():
    x_mean, w_mean = torch.rand(32) + 0.5, torch.rand(32) + 0.5
    target = candidate_scales(x_mean, w_mean, 0.4)
    found = search_scales(x_mean, w_mean, lambda s: float(((s - target) ** 2).sum()))
    assert found.ratio == 0.4 and len(found.losses) == 20 and found.loss == min(found.losses)
    assert torch.equal(found.scales, target)


def test_hessian_loss_equals_the_output_mse():
    x = torch.randn(300, 64, dtype=torch.float64)
    D = torch.randn(16, 64, dtype=torch.float64)
    direct = float(((x @ D.t()) ** 2).mean())
    assert linear_loss_from_hessian(D, x.t() @ x, 300) == pytest.approx(direct, rel=1e-10)


def test_scale_search_beats_plain_rounding_on_salient_channels():
    """The point of AWQ: with a few large input channels, the searched scales lower the output
    error of 4-bit rounding (this fails if scales are applied the wrong way round)."""
    x = _inputs_with_outlier_channels(2048, 128)
    W = torch.randn(64, 128) * 0.05
    xtx = x.t() @ x

    def loss_of(s):
        return linear_loss_from_hessian(W - scaled_quantized(W, s, 4, 32), xtx, x.shape[0])

    found = search_scales(x.abs().mean(dim=0), weight_channel_mean([W], 32), loss_of)
    plain = loss_of(torch.ones(128))
    assert found.loss < 0.8 * plain and found.ratio > 0


def _reference_clip(W, x, gs, n_grid=20, max_shrink=0.5):
    """The clip search of docs/formats.md#awq-clip-search written directly: error over every token of each group's output."""
    out_f, in_f = W.shape
    w = W.reshape(out_f, 1, -1, gs)
    xg = x.reshape(1, x.shape[0], -1, gs)
    org_out = (xg * w).sum(dim=-1)
    org_max = w.abs().amax(dim=-1, keepdim=True)
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        m = org_max * (1 - i / n_grid)
        q = pseudo_quantize(torch.clamp(w, -m, m).reshape(out_f, in_f), 4, gs).reshape(out_f, 1, -1, gs)
        err = ((xg * q).sum(dim=-1) - org_out).pow(2).mean(dim=1, keepdim=True).reshape(best_err.shape)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, m, best)
    return best.reshape(out_f, -1)


def test_clip_search_from_gram_blocks_equals_the_direct_search():
    x = _inputs_with_outlier_channels(512, 128, seed=3).double()
    W = (torch.randn(40, 128, generator=torch.Generator().manual_seed(4)) * 0.05).double()
    W[:, 5] = 0.6  # an outlier weight per row: clipping it pays
    grams = gram_blocks(x.t() @ x / x.shape[0], 32)
    assert grams.shape == (4, 32, 32)
    found = search_clip(W, grams, 4, 32, rows_per_batch=16)
    expected = _reference_clip(W, x, 32).float()
    assert torch.allclose(found, expected, rtol=1e-6)
    assert (found < W.abs().reshape(40, 4, 32).amax(dim=2).float()).any()
    assert clip_weight(W.float(), found).abs().reshape(40, 4, 32).amax(dim=2).le(found + 1e-7).all()


def test_scaled_gram_blocks_equal_the_blocks_of_the_scaled_whole_matrix():
    """The search's clip Gram blocks, taken without a whole [in, in] temporary, are the same
    numbers (bit for bit) as the blocks of the whole scaled matrix, and differ once s does."""
    x = _inputs_with_outlier_channels(300, 192, seed=5)
    xtx, s = x.t() @ x, torch.rand(192, generator=torch.Generator().manual_seed(6)) + 0.5
    whole = (xtx / 300) / s.unsqueeze(0) / s.unsqueeze(1)
    for group_size in (32, 64, -1):
        assert torch.equal(scaled_gram_blocks(xtx, 300, s, group_size), gram_blocks(whole, group_size))
    assert not torch.equal(scaled_gram_blocks(xtx, 300, s.flip(0), 64), gram_blocks(whole, 64))


def test_losses_and_gram_blocks_from_the_inputs_equal_those_from_the_hessian():
    """With fewer tokens than channels the search keeps X, not X^T X: the same loss and the
    same clip Gram blocks (to float64 rounding), and a wrong s shows."""
    x = _inputs_with_outlier_channels(96, 256, seed=7).double()  # n < in
    g = torch.Generator().manual_seed(8)
    D = torch.randn(48, 256, generator=g, dtype=torch.float64) * 0.01
    s = torch.rand(256, generator=g, dtype=torch.float64) + 0.5
    xtx = x.t() @ x
    assert linear_loss_from_inputs(D, x) == pytest.approx(linear_loss_from_hessian(D, xtx, 96), rel=1e-12)
    assert linear_loss_from_inputs(D, x) == pytest.approx(float(((x @ D.t()) ** 2).mean()), rel=1e-12)
    for group_size in (32, -1):
        assert torch.allclose(scaled_gram_blocks_from_inputs(x, s, group_size),
                              scaled_gram_blocks(xtx, 96, s, group_size), rtol=1e-12, atol=0)
    assert not torch.allclose(scaled_gram_blocks_from_inputs(x, s.flip(0), 32), scaled_gram_blocks(xtx, 96, s, 32))


def test_awq_gemm_nibble_order_is_bit_exact():
    """Output columns 0..7 with codes 0..7 land in one word as nibbles 0 2 4 6 1 3 5 7."""
    codes = torch.arange(8).reshape(8, 1).t().contiguous()  # [out=8, in=1]
    packed = pack_awq(codes.reshape(8, 1).expand(8, 8).contiguous(), torch.zeros(1, 8, dtype=torch.int32), torch.ones(1, 8))
    word = int(packed.qweight[0, 0]) & 0xFFFFFFFF
    assert word == 0x75316420
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(AWQ_ORDER)


@pytest.mark.parametrize("out_f,in_f,gs", [(8, 32, 32), (24, 64, 16), (192, 576, 64)])
def test_awq_pack_roundtrip_and_dequantize(out_f, in_f, gs):
    g = torch.Generator().manual_seed(out_f)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (in_f // gs, out_f), generator=g, dtype=torch.int32)
    scales = torch.rand(in_f // gs, out_f, generator=g) + 0.01
    p = pack_awq(codes, zeros, scales)
    assert p.qweight.shape == (in_f, out_f // 8) and p.qzeros.shape == (in_f // gs, out_f // 8)
    assert p.qweight.dtype == torch.int32 and p.scales.dtype == torch.float16
    c2, z2 = unpack_awq(p)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros)
    group = torch.arange(in_f) // gs
    expected = (codes.float() - zeros.float()[group].t()) * scales.half().float()[group].t()
    assert torch.equal(dequantize_awq(AWQPacked(*p)), expected)
