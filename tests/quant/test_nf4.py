"""Our NF4 against bitsandbytes itself, byte for byte."""
from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState

from qlora_quant.nf4 import DYNAMIC_CODE, NF4_CODE, decode_absmax, dequantize_nf4, nf4_from_state_tensors, quant_state_tensors, quantize_nf4
from qlora_kernels.nf4_linear import LinearNF4

SHAPES = [(1,), (3, 5), (63,), (65,), (129,), (7, 1000), (100, 77), (576, 576), (1536, 576), (5000, 3), (2, 3, 67)]


def bnb_reference_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' reference (torch "default" backend) 8-bit blockwise quantizer.

    On CPU the public `quantize_blockwise` goes to bitsandbytes' native CPU library, whose
    search is not nearest-value (it does not even map a code value to its own index); the
    reference backend, like the CUDA kernel, picks the nearest code. We call it directly.
    """
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, x, DYNAMIC_CODE, 256)


def assert_matches_bitsandbytes(w: torch.Tensor, blocksize: int) -> None:
    ours = quantize_nf4(w, blocksize)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    flat_packed, flat_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed, packed), "packed nibbles"
    assert torch.equal(ours.offset, state.offset), "offset"
    # (a block of all-equal absmax stores 1e-38 in the reference backend, 0 in the native one)
    assert torch.allclose(ours.nested_absmax, state.state2.absmax, rtol=0, atol=1e-37), "nested_absmax"
    assert torch.equal(ours.code, state.code), "quant_map"
    assert torch.equal(ours.nested_code, state.state2.code), "nested_quant_map"
    ref_q, ref_absmax = bnb_reference_blockwise(flat_state.absmax - flat_state.absmax.mean())
    assert torch.equal(ours.qabsmax, ref_q), "absmax codes vs bitsandbytes' reference backend"
    assert torch.equal(ours.nested_absmax, ref_absmax)
    # bitsandbytes' native CPU library picks a neighbouring code on a small fraction of entries.
    # (With a single all-equal absmax block there is nothing to encode; both decode to offset.)
    if (state.state2.absmax > 0).all():
        assert (ours.qabsmax != state.absmax).float().mean() < 0.05
    # Serialized state: same keys, same tensors, same JSON bytes.
    theirs = state.as_dict(packed=True)
    mine = quant_state_tensors(ours)
    assert set(mine) == set(theirs)
    for key in ("quant_map", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        assert torch.equal(mine[key], theirs[key]), key
    # bitsandbytes reads our serialized state and dequantizes to exactly what we do.
    their_view = QuantState.from_dict({k: v for k, v in mine.items()}, device=torch.device("cpu"))
    # The layout is blocks of the flattened tensor; bitsandbytes 0.50's CPU kernel mis-decodes
    # 2-D tensors whose rows are not a multiple of the block size (its own quantize ->
    # dequantize round trip of a 576x576 tensor at block 256 is off by up to 4.2), so it reads
    # a flat view. (Its CPU kernel also returns 1-D inputs as [1, n]; the values are what matter.)
    their_view.shape = torch.Size([w.numel()])
    assert torch.equal(bnbf.dequantize_4bit(ours.packed, their_view).reshape(w.shape), dequantize_nf4(ours))


def test_code_tables_match_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_random_tensors_match_bitsandbytes(shape, dtype, blocksize):
    w = (torch.randn(shape) * torch.rand(()) * 3).to(dtype)
    assert_matches_bitsandbytes(w, blocksize)


def test_special_values():
    w = torch.zeros(200)
    w[5] = 1.0
    w[70] = -2.5
    w[130:140] = 1e-30
    assert_matches_bitsandbytes(w, 64)


def test_every_smollm2_linear_matches_bitsandbytes(smollm2_dir):
    from qlora_pipeline.layerwise.checkpoints import read_tensors, weight_map
    from qlora_pipeline.layerwise.families import LLAMA

    wmap = weight_map(smollm2_dir)
    names = [n for n in wmap if n.endswith(".weight") and any(f".{lin}." in n for lin in LLAMA.linears)]
    assert len(names) == 30 * 7
    for name, w in read_tensors(wmap, names).items():
        assert_matches_bitsandbytes(w.to(torch.bfloat16), 64)


def test_roundtrip_through_state_tensors():
    w = torch.randn(33, 70, dtype=torch.bfloat16)
    q = quantize_nf4(w, 64)
    back = nf4_from_state_tensors(q.packed, quant_state_tensors(q))
    assert back.shape == (33, 70) and back.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))
    meta = json.loads(bytes(quant_state_tensors(q)["quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [33, 70] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64


def test_dequantize_error_is_within_one_nf4_step():
    w = torch.randn(64, 128)
    err = (dequantize_nf4(quantize_nf4(w, 64)) - w).abs()
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True).expand(-1, 64).reshape(64, 128)
    assert (err <= absmax * 0.17).all()  # widest NF4 gap is 1 - 0.723 = 0.277; half of it plus dq slack


@pytest.mark.parametrize("shape", [(7, 1000), (100, 77), (65,), (576, 576)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_in_runs_of_blocks_is_the_plain_formula(shape, blocksize, monkeypatch):
    """Dequantizing a few blocks at a time (3 here; sizes with a partial last block) writes
    exactly code[q] * absmax[block], rounded to the requested dtype: the bits of the whole-tensor
    computation."""
    t = quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(3)), blocksize)
    flat = t.packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: t.packed.numel() * 2]
    n = torch.Size(shape).numel()
    absmax = torch.repeat_interleave(decode_absmax(t), blocksize)[:n]
    plain = (t.code[nibbles[:n].long()] * absmax).view(shape)
    monkeypatch.setattr("qlora_quant.nf4.DEQUANT_CHUNK_VALUES", 3 * blocksize)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = dequantize_nf4(t, dtype)
        assert got.dtype == dtype and got.shape == torch.Size(shape) and torch.equal(got, plain.to(dtype))


def test_linear_nf4_forward_equals_dequantized_matmul():
    lin = torch.nn.Linear(96, 40, bias=True)
    q = LinearNF4.from_linear(lin, blocksize=64)
    x = torch.randn(5, 96)
    expected = torch.nn.functional.linear(x, q.dequantized_weight(torch.float32), lin.bias)
    torch.testing.assert_close(q(x), expected)
    assert (q(x) - lin(x)).abs().max() < 0.2 * lin(x).abs().max()


def test_inference_keeps_the_dequantized_weight_unless_told_not_to():
    from qlora_kernels.int4_linear import dequantized_cache

    q = LinearNF4.from_linear(torch.nn.Linear(64, 32), blocksize=64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        with dequantized_cache(False):  # e.g. the eval loss between training steps
            y = q(x)
        assert not hasattr(q, "_dequantized")
        torch.testing.assert_close(q(x), y)  # the same values, now kept for decoding
        assert hasattr(q, "_dequantized")


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(10), 48)
    with pytest.raises(ValueError, match="float"):
        quantize_nf4(torch.arange(10), 64)


def test_inference_keeps_dequantized_weights_within_a_byte_budget(monkeypatch):
    """Past QLP_DEQUANT_CACHE_GB a layer dequantizes at every call instead of keeping its
    float weight (an 8B model's would not fit a 24 GB host); a freed layer gives its bytes back."""
    import gc

    from qlora_kernels import int4_linear

    one_layer = 32 * 64 * 4  # float32 [32, 64]
    monkeypatch.setenv("QLP_DEQUANT_CACHE_GB", str((int4_linear._kept_bytes.get("cpu", 0) + one_layer) / 2**30))
    a = LinearNF4.from_linear(torch.nn.Linear(64, 32), blocksize=64)
    b = LinearNF4.from_linear(torch.nn.Linear(64, 32), blocksize=64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert hasattr(a, "_dequantized") and not hasattr(b, "_dequantized")  # b is past the budget
        torch.testing.assert_close(b(x), yb)  # same values, computed again
        del a
        gc.collect()
        b(x)
        assert hasattr(b, "_dequantized")  # a's bytes were given back


def test_training_with_kept_weights_gives_the_same_gradients(monkeypatch):
    """`training_weights(layers)` (the CPU train stage, when the model's weights fit) dequantizes
    each NF4 layer once instead of twice per step: the same outputs and input gradients, bit
    for bit, and no dequantization after the first step."""
    from qlora_kernels.int4_linear import training_weights
    from qlora_quant import nf4

    torch.manual_seed(0)
    layers = [LinearNF4.from_linear(torch.nn.Linear(128, 96), blocksize=64),
              LinearNF4.from_linear(torch.nn.Linear(96, 128), blocksize=64)]
    x = torch.randn(2, 7, 128)

    def step():
        xi = x.clone().requires_grad_(True)
        y = layers[1](torch.nn.functional.silu(layers[0](xi)))
        (y.square().sum()).backward()
        return y.detach(), xi.grad

    calls = []
    real = nf4.dequantize_nf4
    monkeypatch.setattr("qlora_kernels.nf4_linear.dequantize_nf4",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    y_plain, g_plain = step()
    with training_weights(layers):
        y_kept, g_kept = step()
        first = len(calls)
        y_again, g_again = step()
        assert all(hasattr(layer, "_dequantized") for layer in layers)
    assert torch.equal(y_plain, y_kept) and torch.equal(g_plain, g_kept)
    assert torch.equal(y_again, y_plain) and torch.equal(g_again, g_plain)
    assert len(calls) == first  # the second step dequantized nothing
    assert not any(hasattr(layer, "_dequantized") for layer in layers)  # dropped when the block ends
