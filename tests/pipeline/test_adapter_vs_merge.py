"""Adapter vs merge (issue 14, item 2): artifact `qlora` (the NF4 base + the float adapter,
unmerged) and, per quantize entry with `adapter_on_quantized_base`, `<name>+adapter` (the
original base quantized the same way + the float adapter); the report's comparison."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli, random_adapter, tiny_recipe


def recipe(model_dir, tmp_path, adapter, entries, **sections):
    defaults = {"run": {"name": "a"}, "tracking": {"enabled": False},
                "calibration": {"samples": 4, "seq_len": 128},
                "evaluate": {"speed": False, "prompts": [], "qlora": True}}
    if adapter is not None:
        defaults["merge"] = {"adapter": str(adapter)}
    for key, value in sections.items():
        defaults[key] = {**defaults.get(key, {}), **value}
    r = tiny_recipe(model_dir, tmp_path, **defaults)
    r["quantize"] = entries
    return r


def test_stages_of_the_unmerged_artifacts(tiny_llama_dir, tmp_path, write_recipe):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    entries = [{"name": "ag", "method": "awq+gptq", "group_size": 32, "adapter_on_quantized_base": True},
               {"name": "rtn", "method": "rtn", "group_size": 32}]
    specs = {s.name: s for s in build_stages(load_recipe(write_recipe(recipe(tiny_llama_dir, tmp_path, adapter,
                                                                              entries)))[0])}
    assert specs["evaluate-qlora"].deps == ("data", "base")
    assert specs["evaluate-qlora"].config["adapter"] == str(adapter)
    # The original base, quantized with the same settings and calibration windows, its own AWQ search.
    assert specs["quantize-ag+adapter"].deps == ("calibrate", "awq-search-w4g32-base")
    assert specs["awq-search-w4g32-base"].deps == ("calibrate",) and "model" in specs["awq-search-w4g32-base"].config
    assert specs["quantize-ag+adapter"].config["entry"] == specs["quantize-ag"].config["entry"]
    # the original base: by its files' content in the settings, by its path at run time
    assert specs["quantize-ag+adapter"].config["weights"] == specs["base"].config["weights"]
    assert specs["quantize-ag+adapter"].runtime["model_source"] == str(tiny_llama_dir)
    assert "model" not in specs["quantize-ag"].config and "adapter_on_quantized_base" not in specs["quantize-ag"].config["entry"]
    assert specs["evaluate-ag+adapter"].deps == ("data", "quantize-ag+adapter")
    assert "quantize-rtn+adapter" not in specs
    assert {"evaluate-qlora", "evaluate-ag+adapter"} <= set(specs["report"].deps)
    # Both evaluations are settings-identical to the others: `evaluate.qlora` changes no fingerprint.
    assert specs["evaluate-merged"].config["evaluate"] == specs["evaluate-qlora"].config["evaluate"]
    assert "qlora" not in specs["evaluate-merged"].config["evaluate"]

    # A trained adapter: the evaluations read the train stage's output.
    trained = {s.name: s for s in build_stages(load_recipe(write_recipe(recipe(tiny_llama_dir, tmp_path, None, entries),
                                                                        "t.yaml"))[0])}
    assert trained["evaluate-qlora"].deps == ("data", "base", "train") and "adapter" not in trained["evaluate-qlora"].config
    assert trained["evaluate-ag+adapter"].deps == ("data", "quantize-ag+adapter", "train")
    off = recipe(tiny_llama_dir, tmp_path, adapter, entries[1:], evaluate={"qlora": False})
    assert "evaluate-qlora" not in {s.name for s in build_stages(load_recipe(write_recipe(off, "o.yaml"))[0])}


def test_adapter_on_top_equals_the_float32_merge(tiny_llama_dir, tmp_path):
    """The unmerged adapter's arithmetic: base(x) + scaling * B(A(x)) on every targeted module
    gives the logits of the base with scaling * B @ A added to its weights (float32)."""
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.stages.evaluate import attach_adapter
    from qlora_pipeline.adapter import Adapter

    path = random_adapter(tiny_llama_dir, tmp_path / "adapter", std=0.2)
    ctx = SimpleNamespace(config={"adapter": str(path)}, inputs={})
    windows = torch.randint(0, 1000, (2, 32))
    unmerged = load_hf_model(tiny_llama_dir, torch.float32, "cpu")
    assert attach_adapter(unmerged, ctx, "cpu") == path
    merged = load_hf_model(tiny_llama_dir, torch.float32, "cpu")
    adapter = Adapter(path)
    with torch.no_grad():
        for prefix in adapter.pairs:
            merged.get_submodule(prefix).weight += adapter.delta(prefix)
        plain = load_hf_model(tiny_llama_dir, torch.float32, "cpu")(input_ids=windows).logits
        ours, reference = unmerged(input_ids=windows).logits, merged(input_ids=windows).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    assert (ours - plain).abs().max() > 100 * (ours - reference).abs().max()


def test_qlora_and_adapter_on_quantized_base_through_the_runner(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    from qlora_pipeline.layerwise.checkpoints import read_tensors, weight_map
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.recipe import QuantizeEntry

    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter", std=0.2)
    entry = {"name": "rtn", "method": "rtn", "group_size": 32, "adapter_on_quantized_base": True}
    path = write_recipe(recipe(tiny_llama_dir, tmp_path, adapter, [entry], model={"dtype": "float32"}))
    assert cli("run", str(path)) == 0
    run = tmp_path / "runs" / "a"

    def metrics(name):
        return json.loads((run / f"evaluate-{name}" / "output" / "metrics.json").read_text())

    base_nf4, merged, qlora, rtn, onto_base = map(metrics, ("base-nf4", "merged", "qlora", "rtn", "rtn+adapter"))
    # The model as trained is the merged model up to the merge's own rounding (into the float32
    # dequantized NF4 weights here): far closer to it than to the NF4 base without the adapter.
    assert qlora["domain_ppl"] == pytest.approx(merged["domain_ppl"], rel=1e-4)
    assert abs(qlora["domain_ppl"] - base_nf4["domain_ppl"]) > 100 * abs(qlora["domain_ppl"] - merged["domain_ppl"])
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    assert qlora["size_bytes"] == base_nf4["size_bytes"] + adapter_bytes
    assert qlora["weights_bytes"] > base_nf4["weights_bytes"]

    # `rtn+adapter` is the original base quantized as `rtn` is (the same call on the base's weights).
    ours = run / "quantize-rtn+adapter" / "output"
    direct = tmp_path / "direct"
    for d in (direct, tmp_path / "ckpt"):
        d.mkdir()
    quantize_checkpoint(tiny_llama_dir, None, QuantizeEntry(**entry), torch.float32, tmp_path / "ckpt", direct,
                        lambda it, **kw: it, lambda i, m: None)
    a, b = (read_tensors(weight_map(d), weight_map(d)) for d in (ours, direct))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    merged_rtn = load_file(str(next((run / "quantize-rtn" / "output").glob("model-*.safetensors"))))
    assert any(not torch.equal(merged_rtn[k], a[k]) for k in merged_rtn if k.endswith(".qweight"))
    assert onto_base["domain_ppl"] not in (rtn["domain_ppl"], qlora["domain_ppl"])
    assert onto_base["size_bytes"] == float(sum(p.stat().st_size for p in ours.iterdir()) + adapter_bytes)

    report = json.loads((run / "report" / "output" / "metrics.json").read_text())
    rows = {r["unmerged"]: r for r in report["adapter_vs_merge"]}
    assert rows["qlora"]["merged"] == "merged" and rows["rtn+adapter"]["merged"] == "rtn"
    assert rows["rtn+adapter"]["domain_difference"] == pytest.approx(100 * (onto_base["domain_ppl"] / rtn["domain_ppl"] - 1))
    text = (run / "report" / "output" / "report.md").read_text()
    assert "## Adapter vs merge" in text and "| rtn+adapter | rtn |" in text and "| qlora | merged |" in text


def test_recipe_errors(tiny_llama_dir, tmp_path, write_recipe, capsys):
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    for entries, message in (([{"name": "qlora", "method": "rtn"}], "'qlora' is reserved"),
                             ([{"name": "r", "method": "rtn", "adapter_on_quantized_base": "yes please"}],
                              "quantize.0.adapter_on_quantized_base")):
        assert cli("validate", str(write_recipe(recipe(tiny_llama_dir, tmp_path, adapter, entries)))) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_awq_gptq_on_the_original_base_searches_the_base(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    """`<name>+adapter` of an awq+gptq entry runs without the merge: its own AWQ search of the
    original base, then the quantization applying it, then the evaluation with the adapter."""
    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter", std=0.2)
    entry = {"name": "ag", "method": "awq+gptq", "group_size": 32, "adapter_on_quantized_base": True}
    path = write_recipe(recipe(tiny_llama_dir, tmp_path, adapter, [entry], evaluate={"qlora": False}))
    for stage in ("data", "calibrate", "awq-search-w4g32-base", "quantize-ag+adapter", "evaluate-ag+adapter"):
        assert cli("run", str(path), "--only", stage) == 0
    run = tmp_path / "runs" / "a"
    assert not (run / "merge").exists()
    manifest = json.loads((run / "quantize-ag+adapter" / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"calibrate", "awq-search-w4g32-base"}
    qcfg = json.loads((run / "quantize-ag+adapter" / "output" / "config.json").read_text())["quantization_config"]
    assert qcfg["meta"]["quantizer"] == "qlora-pipeline:awq+gptq"
    assert json.loads((run / "evaluate-ag+adapter" / "output" / "metrics.json").read_text())["domain_ppl"] > 0
