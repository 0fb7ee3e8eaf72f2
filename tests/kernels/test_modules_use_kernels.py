"""End to end: the int4 and NF4 modules compute through the kernels when asked (on CUDA by
default; here forced with QLP_KERNELS=triton under the interpreter), and the evaluated
perplexity equals the torch path's to rounding. With a GPU the same checks run on it (CUDA
tensors; the interpreter is off)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_pipeline.scoring import perplexity
from qlora_quant.gptq import gptq_quantize, rtn_quantize
from qlora_kernels.int4_linear import LinearInt4
from qlora_kernels.nf4_linear import LinearNF4
from qlora_quant.packing import pack_awq, pack_gptq

pytest.importorskip("qlora_kernels.triton_kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _swap_linears(model, make):
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, make(child))


def _int4(linear: nn.Linear) -> LinearInt4:
    W = linear.weight.detach().float()
    if W.shape[0] % 3 == 0:  # some layers act-order GPTQ, the others AWQ
        x = torch.randn(256, W.shape[1], generator=torch.Generator().manual_seed(W.shape[0]))
        res = gptq_quantize(W, 2 * x.t() @ x / 256, 4, 32, act_order=True, scale_dtype=torch.float16)
        return LinearInt4.from_gptq(pack_gptq(res.codes, res.zeros, res.scales, res.g_idx, 4, v1=False), 4, v1=False)
    res = rtn_quantize(W, 4, 32, sym=False, scale_dtype=torch.float16)
    return LinearInt4.from_awq(pack_awq(res.codes, res.zeros, res.scales))


@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_perplexity_through_the_kernels_equals_the_torch_path(tiny_llama_dir, monkeypatch, kind):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    _swap_linears(model, _int4 if kind == "int4" else (lambda l: LinearNF4.from_linear(l, 64)))
    model.to(DEVICE)
    windows = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    run = lambda: perplexity(model, windows, 2, DEVICE, lambda x, **k: x, "")[0]
    monkeypatch.setenv("QLP_KERNELS", "torch")
    expected = run()
    monkeypatch.setenv("QLP_KERNELS", "triton")
    calls = []
    import qlora_kernels.triton_kernels as tk

    name = "w4a16_matmul" if kind == "int4" else "nf4_matmul"
    original = getattr(tk, name)
    monkeypatch.setattr(tk, name, lambda *a: calls.append(1) or original(*a))
    got = run()
    assert calls  # the kernels did run
    assert got == pytest.approx(expected, rel=1e-4)


def test_nf4_linear_backward_through_the_kernel(monkeypatch):
    layer = LinearNF4.from_linear(nn.Linear(128, 96, bias=False), 64).to(DEVICE)
    x = torch.randn(5, 128).to(DEVICE)
    grads = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("QLP_KERNELS", mode)
        xi = x.clone().requires_grad_(True)
        (layer(xi) ** 2).sum().backward()
        grads[mode] = xi.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
def test_nf4_linear_under_autocast_runs_in_the_autocast_dtype(monkeypatch, autocast_dtype):
    """float32 activations under autocast are cast to the autocast dtype before the kernel (no
    float32 kernel, no TF32) and come back in it; the input gradient returns to float32.
    Checked through the kernels for fp16; bf16 (wrong in the interpreter) through the twins."""
    monkeypatch.setenv("QLP_KERNELS", "triton" if autocast_dtype == torch.float16 else "torch")
    import qlora_kernels as kernels

    layer = LinearNF4.from_linear(nn.Linear(128, 96, bias=False), 64).to(DEVICE)
    x = torch.randn(5, 128).to(DEVICE).requires_grad_(True)
    calls = []
    original = kernels.nf4_matmul
    monkeypatch.setattr(kernels, "nf4_matmul", lambda a, t: calls.append(a.dtype) or original(a, t))
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        y = layer(x)
    assert calls == [autocast_dtype] and y.dtype == autocast_dtype
    assert torch.equal(y, original(x.detach().to(autocast_dtype), layer.nf4()))
    (y.float() ** 2).sum().backward()
    assert x.grad.dtype == torch.float32
    g = (2 * y.float()).to(autocast_dtype)
    expected = kernels.nf4_matmul_grad_input(g, layer.nf4()).float()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
