"""The GEMV kernels of M <= GEMV_MAX_M (W4A16 for the GPTQ and AWQ layouts, the NF4 forward)
against their plain-torch twins through the interpreter, and the dispatch that routes small M
to them. Tolerances as tests/kernels/test_kernels.py (`assert_matches`): the weight values
equal the twin's, only the float32 summation order differs."""
from __future__ import annotations

import pytest
import torch

from qlora_kernels import reference
from qlora_kernels.layouts import from_awq, from_gptq
from qlora_quant.gptq import rtn_quantize
from qlora_quant.packing import AWQPacked, GPTQPacked, dequantize_awq, dequantize_gptq, pack_awq, pack_gptq

from tests.kernels.test_kernels import DEVICE, _gen, _nf4, assert_matches

tk = pytest.importorskip("qlora_kernels.triton_kernels")

MS = (1, 3, 16)
DTYPES = (torch.float32, torch.float16)


def _shuffled_gptq(n, k, gs, seed):
    """An act-order checkpoint without running GPTQ: groups assigned to a random permutation
    of the rows (every group keeps gs rows), as g_idx after desc_act."""
    res = rtn_quantize(torch.randn(n, k, generator=_gen(seed)) * 0.05, 4, gs, sym=False, scale_dtype=torch.float16)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=_gen(seed + 1))].int()
    # codes were quantized for groups k // gs: requantize each row against its new group's grid
    W = torch.randn(n, k, generator=_gen(seed + 2)) * 0.05
    scales = res.scales.float()[g_idx.long()].t()  # [n, k]
    zeros = res.zeros[g_idx.long()].t()
    codes = (W / scales + zeros).round().clamp(0, 15).to(res.codes.dtype)
    return pack_gptq(codes, res.zeros, res.scales, g_idx, 4, v1=False)


def _weight(layout, n, k, gs, seed, act_order=False):
    if layout == "gptq" and act_order:
        packed = _shuffled_gptq(n, k, gs, seed)
        W = dequantize_gptq(packed, 4, False)
        w = from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=False)
        assert w.perm is not None
        return w, W
    res = rtn_quantize(torch.randn(n, k, generator=_gen(seed)) * 0.05, 4, gs, sym=False, scale_dtype=torch.float16)
    if layout == "gptq":
        v1 = seed % 2 == 1
        zeros = res.zeros.clamp(min=1) if v1 else res.zeros
        packed = pack_gptq(res.codes, zeros, res.scales, res.g_idx, 4, v1=v1)
        return from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=v1), dequantize_gptq(packed, 4, v1)
    packed = pack_awq(res.codes, res.zeros, res.scales)
    return from_awq(AWQPacked(*(t.to(DEVICE) for t in packed))), dequantize_awq(packed)


def _gemv(x, w):
    """The GEMV kernel itself (not through the dispatch)."""
    out = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    tk._w4a16_gemv(x, w, out)
    return out


# (n, k, group): K not a multiple of the K-tile (160 at BK 128 / 64, 96 at 64, 200), N odd
# multiples of 8 (72, 200, 40), groups 32 / 64 / 128, a group taking each row's own (40; and
# 16, per row at M = 1)
W4_SHAPES = [(72, 160, 32), (200, 192, 64), (40, 384, 128), (56, 200, 40), (24, 96, 16)]


@pytest.mark.parametrize("layout", ["gptq", "awq"])
@pytest.mark.parametrize("n,k,gs", W4_SHAPES)
def test_w4a16_gemv_equals_the_twin(layout, n, k, gs):
    w, W = _weight(layout, n, k, gs, seed=n + k)
    for m in MS:
        x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
        for dtype in DTYPES:
            assert_matches(_gemv(x.to(dtype), w), x.to(dtype), W.t().to(DEVICE))


@pytest.mark.parametrize("n,k,gs", [(72, 256, 32), (40, 384, 128), (64, 192, 64)])
def test_w4a16_gemv_act_order_with_a_shuffled_g_idx(n, k, gs):
    w, W = _weight("gptq", n, k, gs, seed=k, act_order=True)
    for m in MS:
        x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
        torch.testing.assert_close(reference.w4a16_matmul(x, w).cpu(), x.cpu() @ W.t(), rtol=1e-5, atol=1e-5)
        for dtype in DTYPES:
            assert_matches(_gemv(x.to(dtype), w), x.to(dtype), W.t().to(DEVICE))


@pytest.mark.parametrize("n,k,blocksize", [(64, 128, 64), (33, 192, 64), (40, 256, 128), (72, 96, 32),
                                           (24, 100, 64)])  # the last: rows not on block bounds
def test_nf4_gemv_equals_the_twin(n, k, blocksize):
    t = _nf4(n, k, n + k, blocksize)
    W = reference.nf4_dequantize(t, torch.float32)
    for m in MS:
        x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
        for dtype in DTYPES:
            out = torch.empty(m, n, dtype=dtype, device=DEVICE)
            tk._nf4_gemv(x.to(dtype), t, out)
            assert_matches(out, x.to(dtype), W.t())


def test_gemv_splits_k_and_leaves_the_workspace_zeroed(monkeypatch):
    """A long K is split across programs (one launch), and the workspace is left at zero."""
    monkeypatch.setattr(tk, "_sm_count", lambda device: 8)
    w, W = _weight("gptq", 64, 1024, 128, seed=1)
    t = _nf4(64, 1024, 2)
    x = torch.randn(2, 1024, generator=_gen(3)).to(DEVICE, torch.float16)
    splits = []
    original = tk._split_k
    monkeypatch.setattr(tk, "_split_k", lambda *a: splits.append(original(*a)) or splits[-1])
    assert_matches(tk.w4a16_matmul(x, w), x, W.t().to(DEVICE))
    assert_matches(tk.nf4_matmul(x, t), x, reference.nf4_dequantize(t, torch.float32).t())
    assert min(splits) > 1
    for ws, count in tk._WORKSPACES.values():
        assert not ws.any() and not count.any()


@pytest.mark.parametrize("m,gemv", [(1, True), (3, True), (16, True), (17, False)])
def test_small_m_routes_to_the_gemv(monkeypatch, m, gemv):
    """M <= GEMV_MAX_M: w4a16_matmul (both layouts) and nf4_matmul call the GEMV; above, the
    split-K / tiled kernels. The NF4 input gradient keeps its kernel at every M."""
    calls = []
    for name in ("_w4a16_gemv", "_nf4_gemv", "_nf4_mm"):
        original = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _n=name, _o=original, **k: calls.append(_n) or _o(*a, **k))
    for layout in ("gptq", "awq"):
        w, _ = _weight(layout, 32, 64, 32, seed=5)
        tk.w4a16_matmul(torch.randn(m, 64, generator=_gen(m)).to(DEVICE, torch.float16), w)
    t = _nf4(32, 64, 6)
    tk.nf4_matmul(torch.randn(1, m, 64, generator=_gen(m)).to(DEVICE, torch.float16), t)
    tk.nf4_matmul_grad_input(torch.randn(m, 32, generator=_gen(m)).to(DEVICE, torch.float16), t)
    if gemv:
        assert calls == ["_w4a16_gemv", "_w4a16_gemv", "_nf4_gemv", "_nf4_mm"]
    else:
        assert calls == ["_nf4_mm", "_nf4_mm"]
