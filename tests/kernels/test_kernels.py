"""Every Triton kernel against its plain-torch twin on fresh random inputs over many shapes;
bit-exact unpacking and lookup.

On the CPU through TRITON_INTERPRET=1 with fp16 and fp32 activations only: the interpreter's
bf16 arithmetic is wrong and it rounds float32 -> bf16 by truncation (docs/kernels.md,
interpreter limits), so the bf16 paths are only compiled here (test_compile.py) and run on a
GPU under the `gpu` marker. Tolerances: fp32 to float32 rounding (the kernels multiply at full
fp32 precision, never TF32); fp16 within one fp16 ulp of the fp16 operands' product summed in
float32 (the same weight values as the twin, a different summation order).
"""
from __future__ import annotations

import pytest
import torch

from qlora_kernels import reference
from qlora_kernels.layouts import from_awq, from_gptq
from qlora_quant.gptq import gptq_quantize, rtn_quantize
from qlora_quant.nf4 import quantize_nf4
from qlora_quant.packing import AWQPacked, GPTQPacked, dequantize_awq, dequantize_gptq, pack_awq, pack_gptq

triton_kernels = pytest.importorskip("qlora_kernels.triton_kernels")
tk = triton_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NF4_FIELDS = ("packed", "qabsmax", "nested_absmax", "offset", "code", "nested_code")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_matches(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """got == x @ w for fp32 (to float32 rounding), or, for fp16, within one fp16 ulp of the
    fp16 operands multiplied and summed in float32, rounded once."""
    assert got.dtype == x.dtype
    want = (x.float() @ w.to(x.dtype).float())
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.to(x.dtype).float(), rtol=2 ** -10, atol=1e-5)


# ---------------------------------------------------------------- NF4

@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((96, 200), 64), ((33, 64), 32), ((128, 256), 128),
                                             ((5, 999), 4096), ((3, 4096), 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nf4_dequantize_is_bit_exact(shape, blocksize, dtype):
    t = quantize_nf4(torch.randn(*shape, generator=_gen(shape[0])), blocksize)
    t = t._replace(**{k: getattr(t, k).to(DEVICE) for k in NF4_FIELDS})
    got = triton_kernels.nf4_dequantize(t, dtype)
    assert torch.equal(got.cpu(), reference.nf4_dequantize(t, dtype).cpu())


def _nf4(n, k, seed, blocksize=64):
    t = quantize_nf4(torch.randn(n, k, generator=_gen(seed)) * 0.05, blocksize)
    return t._replace(**{f: getattr(t, f).to(DEVICE) for f in NF4_FIELDS})


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n,k,blocksize", [(64, 128, 64), (96, 192, 64), (48, 64, 32),
                                           (40, 96, 64), (24, 33, 32)])  # the last two: rows not on block bounds
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_matmul_forward_and_input_gradient(m, n, k, blocksize, dtype):
    t = _nf4(n, k, m + n, blocksize)
    W = reference.nf4_dequantize(t, torch.float32)
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE, dtype)
    assert_matches(triton_kernels.nf4_matmul(x, t), x, W.t())
    g = torch.randn(2, m, n, generator=_gen(m + 1)).to(DEVICE, dtype)  # batched leading dims
    got = triton_kernels.nf4_matmul_grad_input(g, t)
    assert got.shape == (2, m, k)
    assert_matches(got.reshape(-1, k), g.reshape(-1, n), W)


def test_nf4_matmul_with_blocks_larger_than_a_tile():
    t = _nf4(16, 4096, 5, blocksize=4096)
    W = reference.nf4_dequantize(t, torch.float32)
    x = torch.randn(3, 4096, generator=_gen(5)).to(DEVICE)
    assert_matches(triton_kernels.nf4_matmul(x, t), x, W.t())
    g = torch.randn(3, 16, generator=_gen(6)).to(DEVICE)
    assert_matches(triton_kernels.nf4_matmul_grad_input(g, t), g, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_matmul_above_the_crossover_dequantizes_then_multiplies(monkeypatch, dtype):
    monkeypatch.setattr(triton_kernels, "NF4_CUBLAS_MIN_M", 8)
    t = _nf4(64, 128, 1)
    x = torch.randn(9, 128, generator=_gen(2)).to(DEVICE, dtype)
    assert torch.equal(triton_kernels.nf4_matmul(x, t), reference.nf4_matmul(x, t))
    g = torch.randn(9, 64, generator=_gen(3)).to(DEVICE, dtype)
    assert torch.equal(triton_kernels.nf4_matmul_grad_input(g, t), reference.nf4_matmul_grad_input(g, t))


# ---------------------------------------------------------------- W4A16

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


# group sizes: multiples of 16 (K-tiles of 32, 64, 16 inside a group: 32, 128, 48), not a
# multiple of 16 (16-row tiles do not fit: 40, 24; each row's own group) and one group per row (gs = K)
GPTQ_SHAPES = [(64, 128, 32), (72, 256, 128), (128, 192, 64), (40, 96, 16), (64, 96, 48), (64, 160, 40),
               (48, 96, 96), (32, 192, 24), (24, 120, 40)]  # the last: K not a multiple of the K-tile


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64])
@pytest.mark.parametrize("n,k,gs", GPTQ_SHAPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_gptq_layout(m, n, k, gs, act_order):
    v1 = m % 2 == 1
    packed, W = _gptq_weight(n, k, gs, act_order, v1=v1, seed=m * 7 + k)
    w = from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=v1)
    assert (w.perm is not None) == (act_order and not torch.equal(packed.g_idx.long(), torch.arange(k) // gs))
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
    # the twin is the checkpoint's math
    torch.testing.assert_close(reference.w4a16_matmul(x, w).cpu(), x.cpu() @ W.t(), rtol=1e-5, atol=1e-5)
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        assert_matches(triton_kernels.w4a16_matmul(xd, w), xd, W.t().to(DEVICE))


@pytest.mark.parametrize("m", [1, 5, 16, 48])
@pytest.mark.parametrize("n,k,gs", [(64, 128, 32), (136, 256, 128), (24, 64, 64), (64, 96, 48), (64, 120, 40)])
def test_w4a16_awq_layout(m, n, k, gs):
    res = rtn_quantize(torch.randn(n, k, generator=_gen(n)) * 0.05, 4, gs, sym=False, scale_dtype=torch.float16)
    packed = pack_awq(res.codes, res.zeros, res.scales)
    w = from_awq(AWQPacked(*(t.to(DEVICE) for t in packed)))
    W = dequantize_awq(packed)
    torch.testing.assert_close(reference.w4a16_dequantize(w).t().cpu(), W)  # unpack bit-exact
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE)
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        assert_matches(triton_kernels.w4a16_matmul(xd, w), xd, W.t().to(DEVICE))


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_with_bf16_scales(m, dtype):
    """bf16 scales are loaded and widened exactly; the product is rounded once, as in the twin."""
    packed, _ = _gptq_weight(64, 128, 32, act_order=False, v1=False, seed=11)
    packed = packed._replace(scales=packed.scales.bfloat16())  # pack_gptq stores fp16
    W = dequantize_gptq(packed, 4, v1=False)
    w = from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=False)
    x = torch.randn(m, 128, generator=_gen(m)).to(DEVICE, dtype)
    assert_matches(triton_kernels.w4a16_matmul(x, w), x, W.t().to(DEVICE))


@pytest.mark.parametrize("layout,act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_w4a16_above_the_crossover_dequantizes_then_multiplies(monkeypatch, layout, act_order):
    monkeypatch.setattr(triton_kernels, "W4A16_CUBLAS_MIN_M", 8)
    if layout == "gptq":
        packed, W = _gptq_weight(64, 128, 32, act_order, v1=True, seed=4)
        w = from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=True)
        assert (w.perm is not None) == act_order
    else:
        res = rtn_quantize(torch.randn(64, 128, generator=_gen(4)) * 0.05, 4, 32, sym=False, scale_dtype=torch.float16)
        packed = pack_awq(res.codes, res.zeros, res.scales)
        w, W = from_awq(AWQPacked(*(t.to(DEVICE) for t in packed))), dequantize_awq(packed)
    # the dequantize kernel undoes the act-order permutation: exactly the checkpoint's weight
    assert torch.equal(triton_kernels.w4a16_dequantize(w, torch.float32).cpu(), W.t())
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(9, 128, generator=_gen(5)).to(DEVICE, dtype)
        assert_matches(triton_kernels.w4a16_matmul(x, w), x, W.t().to(DEVICE))


def test_gptq_twin_unpacks_bit_exactly():
    packed, W = _gptq_weight(48, 128, 32, act_order=True, v1=True, seed=3)
    w = from_gptq(packed, 4, v1=True)
    # rows of the twin's weight are in the permuted order
    assert torch.equal(reference.w4a16_dequantize(w), W.t()[w.perm])


# ---------------------------------------------------------------- launches and the split-K workspace

class _Recorder:
    """Records the aten ops a wrapper runs outside its Triton launches, and counts launches."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not recorder.in_launch:
                    recorder.ops.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        self.mode, self.ops, self.launches, self.in_launch = Mode(), [], 0, False

    def wrap(self, kernel):
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches += 1
                    recorder.in_launch = True  # the interpreter's own copies are not the wrapper's
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        recorder.in_launch = False

                return launch

        return Launcher()


@pytest.mark.parametrize("kind", ["gptq act-order", "awq", "nf4 forward", "nf4 grad_input"])
def test_small_m_is_one_launch(monkeypatch, kind):
    """At M = 1 a call is one kernel launch and, around it, only allocation and views: no
    memset of a split-K buffer, no cast of it, no gather of x's columns."""
    if kind.startswith("nf4"):
        t = _nf4(64, 256, 1)
        x = torch.randn(1, 64 if kind == "nf4 grad_input" else 256, generator=_gen(1)).to(DEVICE, torch.float16)
        fn = (lambda: tk.nf4_matmul_grad_input(x, t)) if kind == "nf4 grad_input" else (lambda: tk.nf4_matmul(x, t))
        name = "_nf4_matmul_kernel" if kind == "nf4 grad_input" else "_nf4_gemv_kernel"
    else:
        if kind == "awq":
            res = rtn_quantize(torch.randn(64, 256, generator=_gen(2)) * 0.05, 4, 32, sym=False)
            w = from_awq(AWQPacked(*(p.to(DEVICE) for p in pack_awq(res.codes, res.zeros, res.scales.half()))))
        else:
            packed, _ = _gptq_weight(64, 256, 32, act_order=True, v1=False, seed=2)
            w = from_gptq(GPTQPacked(*(p.to(DEVICE) for p in packed)), 4, v1=False)
            assert w.perm is not None
        x = torch.randn(1, 256, generator=_gen(1)).to(DEVICE, torch.float16)
        fn = lambda: tk.w4a16_matmul(x, w)  # noqa: E731
        name = "_w4a16_gemv_kernel"
    expected = fn()  # first call: the workspace is allocated (zeroed) once
    rec = _Recorder()
    monkeypatch.setattr(tk, name, rec.wrap(getattr(tk, name)))
    with rec.mode:
        got = fn()
    assert rec.launches == 1
    assert set(rec.ops) <= {"aten.view", "aten.empty", "aten._unsafe_view", "aten.reshape", "aten.alias"}, rec.ops
    assert torch.equal(got, expected)


def test_split_k_leaves_its_workspace_zeroed_and_results_repeat(monkeypatch):
    splits = []
    original = tk._split_k
    monkeypatch.setattr(tk, "_split_k", lambda *a: splits.append(original(*a)) or splits[-1])
    packed, W = _gptq_weight(64, 256, 32, act_order=False, v1=False, seed=9)
    w = from_gptq(GPTQPacked(*(t.to(DEVICE) for t in packed)), 4, v1=False)
    t = _nf4(48, 192, 3)
    for m in (1, 5, 16):
        x = torch.randn(m, 256, generator=_gen(m)).to(DEVICE, torch.float16)
        first = tk.w4a16_matmul(x, w)
        xn = torch.randn(m, 192, generator=_gen(m)).to(DEVICE, torch.float16)
        nf4_first = tk.nf4_matmul(xn, t)
        for ws, count in tk._WORKSPACES.values():
            assert not ws.any() and not count.any()
        assert torch.equal(tk.w4a16_matmul(x, w), first)
        assert torch.equal(tk.nf4_matmul(xn, t), nf4_first)
    assert max(splits) > 1  # the split-K path did run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 64, 2048])
def test_bf16_on_gpu(m):
    packed, W = _gptq_weight(256, 512, 128, act_order=True, v1=False, seed=5)
    w = from_gptq(GPTQPacked(*(t.cuda() for t in packed)), 4, v1=False)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    want = (x.float() @ W.cuda().t().bfloat16().float())
    torch.testing.assert_close(triton_kernels.w4a16_matmul(x, w).float(), want, rtol=2 ** -7, atol=1e-3)
    t = _nf4(256, 512, 6)
    Wn = reference.nf4_dequantize(t, torch.bfloat16).float()
    torch.testing.assert_close(triton_kernels.nf4_matmul(x, t).float(), x.float() @ Wn.t(), rtol=2 ** -7, atol=1e-3)
    g = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(triton_kernels.nf4_matmul_grad_input(g, t).float(), g.float() @ Wn, rtol=2 ** -7,
                               atol=1e-3)
    assert torch.equal(triton_kernels.nf4_dequantize(t, torch.bfloat16), reference.nf4_dequantize(t, torch.bfloat16))
