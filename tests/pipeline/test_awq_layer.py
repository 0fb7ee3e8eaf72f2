"""AWQ on a real decoder layer: folding scales keeps the layer's function; search finds scales
that lower the quantized layer's error."""
from __future__ import annotations

import pytest
import torch

from qlora_pipeline.layerwise.awq_search import (
    AWQSettings, GroupInput, _Kwargs, active_groups, apply_clip, apply_scales, capture, search_layer_clip,
    search_layer_scales,
)
from qlora_pipeline.layerwise.checkpoints import read_prefix, weight_map
from qlora_pipeline.layerwise.engine import Activations
from qlora_pipeline.layerwise.families import LLAMA
from qlora_pipeline.layerwise.runner import LayerwiseRunner
from qlora_pipeline.layerwise.checkpoints import read_config
from qlora_quant.awq import pseudo_quantize
from tests.conftest import make_tiny_llama


def _layer(model_dir, i=0):
    runner = LayerwiseRunner(read_config(model_dir), torch.float32, LLAMA)
    layer = runner.layers[i]
    runner.materialize(layer, read_prefix(weight_map(model_dir), f"model.layers.{i}."), torch.float32)
    return runner, layer


def _inputs(runner, n=4, L=32, dim=64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, L, dim, generator=g)
    hidden[..., ::9] *= 15  # salient channels
    pos_ids = torch.arange(L).unsqueeze(0)
    return hidden, _Kwargs(pos_ids, runner.base.rotary_emb(hidden, position_ids=pos_ids))


def _forward(layer, hidden, kw):
    return layer(hidden, attention_mask=None, position_ids=kw.position_ids, position_embeddings=kw.position_embeddings)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folding_scales_keeps_the_layer_function(tmp_path, smollm2_dir, kv_heads):
    model_dir = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=1, kv_heads=kv_heads)
    runner, layer = _layer(model_dir)
    hidden, kw = _inputs(runner)
    before = _forward(layer, hidden, kw)
    groups = active_groups(layer, LLAMA)
    assert len(groups) == (4 if kv_heads == 4 else 3)
    g = torch.Generator().manual_seed(1)
    result = {f"scales.{grp.prev_op}": torch.rand(layer.get_submodule(grp.linears[0]).in_features, generator=g) * 4 + 0.25
              for grp in groups}
    apply_scales(layer, groups, result, torch.float32)  # float32: no rounding of the folded norms
    assert torch.allclose(_forward(layer, hidden, kw), before, rtol=1e-4, atol=1e-4)


def _quantized_error(layer, hidden, kw, reference):
    for name in LLAMA.linears:
        m = layer.get_submodule(name)
        m.weight.data = pseudo_quantize(m.weight.data, 4, 32)
    return float(((_forward(layer, hidden, kw) - reference) ** 2).mean().detach())


def test_searched_scales_and_clipping_lower_the_quantized_layer_error(tmp_path, smollm2_dir):
    model_dir = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=1)
    runner, layer = _layer(model_dir)
    hidden, kw = _inputs(runner, n=8)
    reference = _forward(layer, hidden, kw)
    plain = _quantized_error(_layer(model_dir)[1], hidden, kw, reference)

    groups = list(LLAMA.awq_groups)
    acts = Activations(tuple(hidden.shape), torch.float32, torch.device("cpu"), "device", chunk=4)
    acts.write(0, hidden)
    inputs = capture(layer, groups, acts, kw, search_windows=4)
    assert inputs[0].samples.shape == (4, 32, 64) and inputs[3].samples is None  # down_proj: Hessian loss only
    assert inputs[2].n == 8 * 32
    settings = AWQSettings(4, 32, True, True, 4)
    scales, metrics = search_layer_scales(layer, LLAMA, inputs, settings, kw, chunk=4)
    for grp in active_groups(layer, LLAMA):
        assert metrics[f"awq.{grp.prev_op}.loss"] <= metrics[f"awq.{grp.prev_op}.loss_unscaled"]
    apply_scales(layer, active_groups(layer, LLAMA), scales, torch.float32)
    clip = search_layer_clip(layer, LLAMA, inputs, scales, settings)
    assert set(clip) == {f"clip.{n}" for n in LLAMA.linears if n not in LLAMA.awq_no_clip}
    for key, max_val in clip.items():  # searched on the weights as folded: a shrink of 1 .. 0.55
        w = layer.get_submodule(key[len("clip."):]).weight
        shrink = max_val / w.abs().reshape(w.shape[0], -1, 32).amax(dim=2)
        assert shrink.min() >= 0.55 - 1e-6 and shrink.max() <= 1 + 1e-6
    apply_clip(layer, clip)
    awq = _quantized_error(layer, hidden, kw, reference)
    assert awq < 0.9 * plain


def test_search_from_kept_inputs_equals_the_search_from_the_hessian(tmp_path, smollm2_dir):
    """Fewer calibration tokens (2 x 48) than down_proj's 128 input channels: its group keeps the
    inputs instead of X^T X, and the search finds what the Hessian form finds: the same ratio
    per group, the same losses and clip values to float32 rounding."""
    model_dir = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=1)
    runner, layer = _layer(model_dir)
    hidden, kw = _inputs(runner, n=2, L=48)
    groups = list(LLAMA.awq_groups)
    acts = Activations(tuple(hidden.shape), torch.float32, torch.device("cpu"), "device", chunk=4)
    acts.write(0, hidden)
    kept = capture(layer, groups, acts, kw, search_windows=2)
    assert [inp.keep_rows for inp in kept] == [False, False, False, True]  # in 64, 64, 64, 128 > 96 tokens
    assert kept[3].xtx is None and kept[3].rows.shape == (96, 128)
    from_hessian = capture(layer, groups, acts, kw, search_windows=2)
    from_hessian[3] = GroupInput(xtx=kept[3].rows.t() @ kept[3].rows, abs_sum=kept[3].abs_sum, n=kept[3].n)
    settings = AWQSettings(4, 32, True, True, 2)
    results = []
    for inputs in (kept, from_hessian):
        searched_layer = _layer(model_dir)[1]
        scales, metrics = search_layer_scales(searched_layer, LLAMA, inputs, settings, kw, chunk=4)
        apply_scales(searched_layer, active_groups(searched_layer, LLAMA), scales, torch.float32)
        results.append((scales, metrics, search_layer_clip(searched_layer, LLAMA, inputs, scales, settings)))
    (s1, m1, c1), (s2, m2, c2) = results
    assert {k: v for k, v in m1.items() if k.endswith(".ratio")} == {k: v for k, v in m2.items() if k.endswith(".ratio")}
    for key in m1:
        assert m1[key] == pytest.approx(m2[key], rel=1e-4)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.allclose(c1[k], c2[k], rtol=1e-5) for k in c1)


def test_the_entry_compute_dtype_reaches_the_search_forwards_and_not_its_statistics(tmp_path, smollm2_dir):
    """`compute_dtype: bfloat16` runs the capture forward and every candidate's block forward under
    bf16 autocast (they are calibration forwards: the setting's promise), while X^T X and the
    channel means accumulate in float32. float32 (the default) runs every forward without autocast,
    so its search is the one the code made before the setting reached it."""
    model_dir = make_tiny_llama(tmp_path / "m", smollm2_dir, layers=1)
    runner, _ = _layer(model_dir)
    hidden, kw = _inputs(runner, n=4)
    acts = Activations(tuple(hidden.shape), torch.float32, torch.device("cpu"), "device", chunk=4)
    acts.write(0, hidden)
    settings = AWQSettings(4, 32, True, False, 4)
    seen = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = _layer(model_dir)[1]
        modes = seen.setdefault(dtype, set())
        hooks = [layer.get_submodule(name).register_forward_hook(
            lambda m, i, o, modes=modes: modes.add((torch.is_autocast_enabled("cpu"), (o[0] if isinstance(o, tuple) else o).dtype)))
            for name in ("self_attn", "mlp")]
        inputs = capture(layer, list(LLAMA.awq_groups), acts, kw, 4, dtype)
        assert all(inp.xtx is None or inp.xtx.dtype == torch.float32 for inp in inputs)
        assert all(inp.abs_sum.dtype == torch.float32 and (inp.samples is None or inp.samples.dtype == torch.float32)
                   for inp in inputs)
        search_layer_scales(layer, LLAMA, inputs, settings, kw, chunk=4, compute_dtype=dtype)
        for h in hooks:
            h.remove()
    assert seen[torch.float32] == {(False, torch.float32)}
    assert seen[torch.bfloat16] == {(True, torch.bfloat16)}
