"""The deployment answers through the runner on the tiny model: `nf4` and `int8` quantize stages,
their evaluations (with `evaluate.kv_fp8`), and the report's memory plan from what the
evaluations recorded."""
from __future__ import annotations

import json

from qlora_pipeline import memory_plan
from tests.conftest import cli, random_adapter, tiny_recipe


def test_nf4_int8_fp8_kv_and_memory_plan_through_the_runner(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    from qlora_pipeline.layerwise.checkpoints import read_tensors, weight_map

    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, run={"name": "d"}, tracking={"enabled": False},
                         merge={"adapter": str(adapter)},
                         evaluate={"speed": False, "kv_fp8": True, "kv_fp8_calibration_windows": 2, "prompts": []})
    recipe["quantize"] = [{"name": "nf4", "method": "nf4"}, {"name": "int8", "method": "int8"}]
    recipe["deploy"] = {"contexts": [128, 4096], "batch_sizes": [1, 4], "kv_dtypes": ["bf16", "fp8"],
                        "gpu_memory_gb": 0.015}
    assert cli("run", str(write_recipe(recipe))) == 0
    run = tmp_path / "runs" / "d"

    evaluations = {}
    for name in ("base", "base-nf4", "merged", "nf4", "int8"):
        m = json.loads((run / f"evaluate-{name}" / "output" / "metrics.json").read_text())
        evaluations[name] = m
        assert m["kv_shape"] == {"layers": 3, "kv_heads": 2, "head_dim": 16}
        assert len(m["kv_fp8_scales"]) == 3 and all(k > 0 and v > 0 for k, v in m["kv_fp8_scales"])
        assert m["kv_fp8_domain_ppl"] != m["domain_ppl"] and m["kv_fp8_calibrated_domain_ppl"] != m["domain_ppl"]
    for name in ("nf4", "int8"):
        out = run / f"quantize-{name}" / "output"
        assert evaluations[name]["weights_bytes"] == memory_plan.checkpoint_tensor_bytes(out)
    merged = evaluations["merged"]["weights_bytes"]
    assert evaluations["nf4"]["weights_bytes"] < evaluations["int8"]["weights_bytes"] < merged
    # NF4 of the merged model is the base stage's NF4 of other weights: the same tensors, shapes and
    # dtypes; only the quant state's JSON (its nested offset as text) may differ in length.
    ours, base = (read_tensors(weight_map(d), weight_map(d)) for d in (run / "quantize-nf4" / "output", run / "base" / "output"))
    assert sorted(ours) == sorted(base)
    assert all((ours[k].shape, ours[k].dtype) == (base[k].shape, base[k].dtype) for k in ours if "quant_state" not in k)
    assert abs(evaluations["nf4"]["weights_bytes"] - evaluations["base-nf4"]["weights_bytes"]) < 21 * 8
    assert json.loads((run / "quantize-int8" / "output" / "config.json").read_text())["quantization_config"][
        "load_in_8bit"] is True

    report = json.loads((run / "report" / "output" / "metrics.json").read_text())
    rows = report["memory_plan"]
    assert {r["artifact"] for r in rows} == set(evaluations)
    assert len(rows) == len(evaluations) * 2 * 2 * 2
    gpu = int(0.015 * 2**30)  # the tiny model's weights are about 0.012 GiB (its 49152-token embedding)
    for r in rows:
        assert r["weights_bytes"] == evaluations[r["artifact"]]["weights_bytes"]
        per_element = {"bf16": 2, "fp8": 1}[r["kv_dtype"]]
        assert r["kv_cache_bytes"] == 2 * 3 * 2 * 16 * per_element * r["context"] * r["batch"]
        assert r["fits"] == (r["weights_bytes"] + r["kv_cache_bytes"] <= gpu)
    assert any(r["fits"] for r in rows) and not all(r["fits"] for r in rows)
    text = (run / "report" / "output" / "report.md").read_text()
    assert "## Deployment memory" in text and "| int8 | 4096 | fp8 |" in text
    assert "Δ fp8 KV | Δ fp8 KV (calibrated) |" in text
    assert (run / "report" / "output" / "memory_vs_context.png").is_file()
