"""Every Triton kernel against its plain-torch twin on fresh random inputs over many shapes;
bit-exact unpacking and lookup. On the CPU through TRITON_INTERPRET=1 (fp16/fp32 activations:
the interpreter's bf16 arithmetic is wrong), on CUDA natively (`gpu` marker adds bf16)."""
from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.layouts import from_awq, from_gptq
from quant.gptq import gptq_quantize, rtn_quantize
from quant.nf4 import quantize_nf4
from quant.packing import AWQPacked, GPTQPacked, dequantize_awq, dequantize_gptq, pack_awq, pack_gptq

triton_kernels = pytest.importorskip("kernels.triton_kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((96, 200), 64), ((33, 64), 32), ((128, 256), 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nf4_dequantize_is_bit_exact(shape, blocksize, dtype):
    t = quantize_nf4(torch.randn(*shape, generator=_gen(shape[0])), blocksize)
    t = t._replace(**{k: getattr(t, k).to(DEVICE) for k in ("packed", "qabsmax", "nested_absmax", "offset", "code", "nested_code")})
    got = triton_kernels.nf4_dequantize(t, dtype)
    assert torch.equal(got.cpu(), reference.nf4_dequantize(t, dtype).cpu())


def _nf4(n, k, seed):
    t = quantize_nf4(torch.randn(n, k, generator=_gen(seed)) * 0.05, 64)
    return t._replace(**{f: getattr(t, f).to(DEVICE) for f in ("packed", "qabsmax", "nested_absmax", "offset", "code", "nested_code")})


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n,k", [(64, 128), (96, 192), (40, 64)])
def test_nf4_matmul_forward_and_input_gradient(m, n, k):
    t = _nf4(n, k, m + n)
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
    torch.testing.assert_close(triton_kernels.nf4_matmul(x, t), reference.nf4_matmul(x, t), rtol=1e-4, atol=1e-4)
    g = torch.randn(2, m, n, generator=_gen(m + 1)).to(DEVICE)  # batched leading dims
    torch.testing.assert_close(triton_kernels.nf4_matmul_grad_input(g, t), reference.nf4_matmul_grad_input(g, t),
                               rtol=1e-4, atol=1e-4)


def _gptq_weight(n, k, gs, act_order, v1, seed):
    W = torch.randn(n, k, generator=_gen(seed)) * 0.05
    if act_order:
        x = torch.randn(256, k, generator=_gen(seed + 1))
        res = gptq_quantize(W, 2 * x.t() @ x / 256, 4, gs, sym=False, act_order=True, static_groups=False,
                            scale_dtype=torch.float16)
    else:
        res = rtn_quantize(W, 4, gs, sym=False, scale_dtype=torch.float16)
    zeros = res.zeros.clamp(min=1) if v1 else res.zeros  # v1 cannot store a zero of 0
    packed = pack_gptq(res.codes.clamp(0, 15), zeros, res.scales, res.g_idx, 4, v1=v1)
    return packed, dequantize_gptq(packed, 4, v1)


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64])
@pytest.mark.parametrize("n,k,gs", [(64, 128, 32), (72, 256, 128), (128, 192, 64), (40, 96, 16)])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_gptq_layout(m, n, k, gs, act_order):
    packed, W = _gptq_weight(n, k, gs, act_order, v1=(m % 2 == 1), seed=m * 7 + k)
    w = from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=(m % 2 == 1))
    assert (w.perm is not None) == (act_order and not torch.equal(packed.g_idx.long(), torch.arange(k) // gs))
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
    ref = reference.w4a16_matmul(x, w)
    torch.testing.assert_close(ref.cpu(), x.cpu() @ W.t(), rtol=1e-4, atol=1e-4)  # the twin is the checkpoint's math
    torch.testing.assert_close(triton_kernels.w4a16_matmul(x, w), ref, rtol=1e-4, atol=1e-4)
    xh = x.half()
    torch.testing.assert_close(triton_kernels.w4a16_matmul(xh, w).float(), reference.w4a16_matmul(xh, w).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 5, 16, 48])
@pytest.mark.parametrize("n,k,gs", [(64, 128, 32), (136, 256, 128), (24, 64, 64)])
def test_w4a16_awq_layout(m, n, k, gs):
    res = rtn_quantize(torch.randn(n, k, generator=_gen(n)) * 0.05, 4, gs, sym=False, scale_dtype=torch.float16)
    packed = pack_awq(res.codes, res.zeros, res.scales)
    w = from_awq(AWQPacked(*(t.to(DEVICE) for t in packed)))
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
    torch.testing.assert_close(reference.w4a16_dequantize(w).t().cpu(), dequantize_awq(packed))  # unpack bit-exact
    torch.testing.assert_close(triton_kernels.w4a16_matmul(x, w), x @ dequantize_awq(packed).to(DEVICE).t(),
                               rtol=1e-4, atol=1e-4)


def test_gptq_twin_unpacks_bit_exactly():
    packed, W = _gptq_weight(48, 128, 32, act_order=True, v1=True, seed=3)
    w = from_gptq(packed, 4, v1=True)
    # rows of the twin's weight are in the permuted order
    assert torch.equal(reference.w4a16_dequantize(w), W.t()[w.perm])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu():
    packed, W = _gptq_weight(256, 512, 128, act_order=False, v1=False, seed=5)
    w = from_gptq(GPTQPacked(*(t.cuda() for t in packed)), 4, v1=False)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(triton_kernels.w4a16_matmul(x, w).float(), (x.float() @ W.cuda().t()), rtol=2e-2, atol=5e-2)
