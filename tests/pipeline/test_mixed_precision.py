"""Mixed precision per module (`dynamic`): each linear quantized with the settings its first
matching key gives, the GPTQModel `dynamic` mapping in the checkpoint, our loader honouring it,
and recipe errors naming the key."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_pipeline.errors import InputError
from qlora_pipeline.methods import check_shapes, dynamic, relevant_settings
from qlora_pipeline.recipe import QuantizeEntry
from tests.conftest import cli, random_adapter
from tests.pipeline.test_quantize import quant_recipe

# the tiny Llama: hidden 64 (q/k/v/gate/up and o_proj inputs), intermediate 128 (down_proj's input)
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 3}
MIXED = {"name": "mixed", "method": "rtn", "group_size": 32,
         "dynamic": {r".*self_attn\.": {"group_size": 16}, r"+:.*mlp\.down_proj": {"bits": 8, "group_size": 64},
                     r"model\.layers\.0\.mlp\.up_proj": {"bits": 8}}}


def test_the_first_matching_key_decides_from_the_start_of_the_name():
    mapping = {r".*mlp\.down_proj": {"bits": 8}, r".*mlp\.": {"group_size": 32}, r"mlp\.up_proj": {"bits": 2}}
    assert dynamic.override(mapping, "model.layers.3.mlp.down_proj") == {"bits": 8}
    assert dynamic.override(mapping, "model.layers.3.mlp.up_proj") == {"group_size": 32}  # not the 2-bit key: anchored
    assert dynamic.override(mapping, "model.layers.3.self_attn.q_proj") == {}
    entry = QuantizeEntry.model_validate(MIXED)
    assert dynamic.module_entry(entry, "model.layers.1.mlp.down_proj").bits == 8
    assert dynamic.module_entry(entry, "model.layers.0.mlp.up_proj").bits == 8
    assert dynamic.module_entry(entry, "model.layers.1.mlp.up_proj") is entry
    assert dynamic.module_entry(entry, "model.layers.1.self_attn.o_proj").group_size == 16


@pytest.mark.parametrize("entry, message", [
    ({"name": "m", "method": "rtn", "dynamic": {"-:.*down_proj": {"bits": 8}}}, "'-:' keys"),
    ({"name": "m", "method": "rtn", "dynamic": {"(": {"bits": 8}}}, "not a regular expression"),
    ({"name": "m", "method": "rtn", "dynamic": {".*down_proj": {}}}, "sets bits, group_size or both"),
    ({"name": "m", "method": "awq", "dynamic": {".*down_proj": {"group_size": 64}}}, "takes no per-module overrides"),
    ({"name": "m", "method": "awq+gptq", "dynamic": {".*down_proj": {"group_size": 64}}}, "methods that do: rtn, gptq"),
])
def test_entries_the_recipe_rejects(entry, message):
    with pytest.raises(ValueError, match=message):
        QuantizeEntry.model_validate(entry)


@pytest.mark.parametrize("mapping, message", [
    ({r"mlp\.down_proj": {"bits": 8}}, r"quantize.0.dynamic['mlp\.down_proj']: matches no quantized linear"),
    ({r".*down_proj": {"group_size": 48}}, r"quantize.0.dynamic['.*down_proj'].group_size: 48 does not divide the "
                                           "model's intermediate_size 128 (model.layers.0.mlp.down_proj)"),
    ({r".*o_proj": {"bits": 3, "group_size": -1}}, r"quantize.0.dynamic['.*o_proj'].bits: 3-bit packing needs "
                                                   "sizes divisible by 32; attention_size is 48"),
])
def test_shape_errors_name_the_key(mapping, message):
    entry = QuantizeEntry.model_validate({"name": "m", "method": "gptq", "group_size": 16, "dynamic": mapping})
    with pytest.raises(InputError) as err:  # o_proj reads 4 heads x 12 = 48 columns
        check_shapes(entry, {**TINY, "head_dim": 12}, "quantize.0")
    assert message in str(err.value)
    check_shapes(QuantizeEntry.model_validate({**MIXED}), TINY, "quantize.0")  # every key matches, every group fits


def test_an_entry_without_overrides_keeps_its_fingerprint_settings():
    plain = relevant_settings(QuantizeEntry.model_validate({"name": "g", "method": "gptq"}))
    assert "dynamic" not in plain
    assert relevant_settings(QuantizeEntry.model_validate(MIXED))["dynamic"][r"+:.*mlp\.down_proj"]["bits"] == 8


def test_a_recipe_pattern_that_matches_nothing_stops_before_anything_is_written(
        tiny_llama_dir, tmp_path, write_recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "bad", adapter,
                                     [{"name": "m", "method": "rtn", "group_size": 32,
                                       "dynamic": {"down_proj": {"bits": 8}}}]))
    assert cli("run", str(path)) == 2
    err = capsys.readouterr().err
    assert "quantize.0.dynamic['down_proj']: matches no quantized linear" in err and r"'.*mlp\.down_proj'" in err
    assert not (tmp_path / "runs").exists()


def test_each_linear_is_quantized_with_its_own_settings_and_loads_with_them(
        tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    from qlora_pipeline.layerwise.checkpoints import load_int4_model
    from qlora_quant.gptq import rtn_quantize

    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "mixed", adapter, [MIXED]))
    for stage in ("data", "base", "merge", "quantize-mixed"):
        assert cli("run", str(path), "--only", stage) == 0
    run_dir = tmp_path / "runs" / "mixed"
    out = run_dir / "quantize-mixed" / "output"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert qcfg["dynamic"] == {r".*self_attn\.": {"group_size": 16}, r"+:.*mlp\.down_proj": {"bits": 8, "group_size": 64},
                               r"model\.layers\.0\.mlp\.up_proj": {"bits": 8}}
    assert list(qcfg["dynamic"]) == list(MIXED["dynamic"])  # order decides, so it is kept

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in set(index.values()):
        tensors.update(load_file(str(out / shard)))
    merged = {}
    for shard in (run_dir / "merge" / "output").glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    model = load_int4_model(out, torch.float32, "cpu")
    expected = {  # module -> (bits, group size, input size)
        "model.layers.1.self_attn.q_proj": (4, 16, 64), "model.layers.2.self_attn.o_proj": (4, 16, 64),
        "model.layers.1.mlp.down_proj": (8, 64, 128), "model.layers.0.mlp.up_proj": (8, 32, 64),
        "model.layers.1.mlp.up_proj": (4, 32, 64), "model.layers.2.mlp.gate_proj": (4, 32, 64),
    }
    for name, (bits, group, n) in expected.items():
        assert tensors[f"{name}.qweight"].shape[0] == n * bits // 32
        assert tensors[f"{name}.scales"].shape[0] == n // group
        module = model.get_submodule(name)
        assert module.bits == bits
        # round-to-nearest is per linear and deterministic: the loaded weight is exactly the one
        # rtn gives that linear with its own settings
        ref = rtn_quantize(merged[f"{name}.weight"].float(), bits, group, False, False, scale_dtype=torch.float16).Q
        torch.testing.assert_close(module.dequantized_weight(), ref, rtol=0, atol=1e-6)


def test_the_recipe_logs_its_overrides_as_mlflow_params(tmp_path):
    """MLflow names hold no '*' or '\\': the mapping is one param, its value the JSON."""
    from mlflow.utils.validation import _validate_param_name

    from qlora_pipeline.recipe import flatten, load_recipe
    from tests.conftest import REPO

    recipe, _ = load_recipe(REPO / "recipes" / "smollm2_compare.yaml")
    params = flatten(recipe)
    for name in params:
        _validate_param_name(name)
    assert json.loads(params["quantize.gptq-mixed.dynamic"])[r".*mlp\.down_proj"]["bits"] == 8
