"""The deployment memory plan: KV cache and weight bytes from a config, `pipeline memory`, and the
report's memory plan (metrics.json rows, table, plot)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlora_pipeline import memory_plan
from tests.conftest import cli

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


@pytest.fixture
def llama3_8b(tmp_path):
    path = tmp_path / "Meta-Llama-3-8B" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA3_8B))
    return path


def test_kv_cache_counts_key_value_heads(llama3_8b):
    att = memory_plan.attention(LLAMA3_8B)
    assert att == (32, 8, 128)
    for kv_dtype, nbytes in (("bf16", 2), ("fp8", 1)):
        for context, batch in ((4096, 1), (32768, 32), (8192, 8)):
            assert memory_plan.kv_cache_bytes(att, context, batch, kv_dtype) == 2 * 32 * 8 * 128 * nbytes * context * batch
    # head_dim given explicitly (not hidden / heads) is the one used
    assert memory_plan.attention({**LLAMA3_8B, "head_dim": 256}).head_dim == 256


def test_weight_bytes_from_the_config_shapes():
    bf16 = memory_plan.estimated_weight_bytes(LLAMA3_8B, bits=16)
    assert bf16 == 2 * 8_030_261_248  # Llama-3-8B's 8.03e9 parameters in bf16: 16.06e9 bytes
    int4 = memory_plan.estimated_weight_bytes(LLAMA3_8B, bits=4, group_size=128)
    linears = 6_979_321_856  # parameters in the decoder linears
    embeddings_and_norms = 2 * (2 * 128256 * 4096 + 65 * 4096)
    # packed codes + an fp16 scale and a 4-bit zero per 128 weights
    assert int4 == embeddings_and_norms + linears // 2 + linears // 128 * 2 + linears // 128 // 2
    assert 5.5e9 < int4 < 6.0e9
    assert memory_plan.estimated_weight_bytes({**LLAMA3_8B, "tie_word_embeddings": True}) == bf16 - 2 * 128256 * 4096
    with pytest.raises(ValueError, match="mixture-of-experts"):
        memory_plan.estimated_weight_bytes({**LLAMA3_8B, "num_local_experts": 8})


def test_bf16_estimate_equals_a_real_checkpoints_tensor_bytes(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert memory_plan.estimated_weight_bytes(config, bits=16) == memory_plan.checkpoint_tensor_bytes(tiny_llama_dir)


def test_rows_fit_and_the_largest_batch(llama3_8b):
    att = memory_plan.attention(LLAMA3_8B)
    weights = memory_plan.estimated_weight_bytes(LLAMA3_8B, bits=4)
    rows = memory_plan.plan_rows("l3", att, weights, [4096, 32768], [1, 32], ["bf16", "fp8"], 24)
    assert len(rows) == 8
    gpu = 24 * 2**30
    for r in rows:
        assert set(r) == {"artifact", "context", "batch", "kv_dtype", "weights_bytes", "kv_cache_bytes", "total_bytes",
                          "fits", "max_batch"}
        assert r["total_bytes"] == r["weights_bytes"] + r["kv_cache_bytes"] and r["fits"] == (r["total_bytes"] <= gpu)
        per_seq = att.kv_bytes_per_token(r["kv_dtype"]) * r["context"]
        assert weights + r["max_batch"] * per_seq <= gpu < weights + (r["max_batch"] + 1) * per_seq
    assert memory_plan.max_batch(att, 25 * 2**30, 4096, "bf16", gpu) == 0  # the weights alone do not fit


def test_memory_command(llama3_8b, capsys):
    assert cli("memory", str(llama3_8b.parent), "--bits", "4", "--group-size", "128", "--context", "4096", "32768",
               "--batch", "1", "32", "--kv-dtype", "fp8", "--gpu-memory-gb", "24", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["context"], r["batch"], r["kv_dtype"]) for r in rows] == [
        (4096, 1, "fp8"), (4096, 32, "fp8"), (32768, 1, "fp8"), (32768, 32, "fp8")]
    assert rows[3]["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 32768 * 32 and rows[3]["fits"] is False
    assert rows[0]["weights_bytes"] == memory_plan.estimated_weight_bytes(LLAMA3_8B, 4, 128)

    assert cli("memory", str(llama3_8b)) == 0  # a config.json path; the deploy section's defaults
    out = capsys.readouterr().out
    assert "32 layers, 8 KV heads x 128" in out and "| Meta-Llama-3-8B | 8192 | fp8 |" in out
    assert "total, batch 32 (GiB)" in out and "Not counted: activations" in out

    # torch-free: the command sizes a model on a machine without torch
    code = ("import sys; from qlora_pipeline.cli import main; "
            f"sys.exit(main(['memory', {str(llama3_8b)!r}, '--json']) or 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    bad = llama3_8b.parent / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 4096}))
    assert cli("memory", str(bad)) == 2
    assert "not a usable model config.json" in capsys.readouterr().err


def test_memory_counts_a_quantized_checkpoint_as_it_is_stored(llama3_8b, tmp_path, capsys):
    """A GPTQ checkpoint's config.json was counted as bf16 (its quantization_config ignored)."""
    config = {**json.loads(llama3_8b.read_text()), "quantization_config": {"quant_method": "gptq", "bits": 4,
                                                                           "group_size": 64}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert cli("memory", str(path), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["weights_bytes"] == memory_plan.estimated_weight_bytes(config, 4, 64)
    assert cli("memory", str(path), "--bits", "8") == 0
    assert "weights (8-bit, group 64; the checkpoint itself is stored at 4 bits, group 64)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--bits", "4", "--group-size", "0"], "--bits 4 --group-size 0: give bits 2-8 (or 16)"),
    (["--bits", "12"], "--bits 12 --group-size 128: give bits 2-8 (or 16)"),
    (["--bits", "1"], "give bits 2-8"),
    (["--group-size", "-5"], "a group size >= 1 or -1"),
    (["--bits", "4", "--group-size", "7"], "--group-size 7 does not divide the model's hidden_size 4096: give"),
    (["--gpu-memory-gb", "nan"], "--gpu-memory-gb nan: give the GPU's memory in GiB, above 0 and at most 1,000,000"),
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb inf: give the GPU's memory in GiB"),
    (["--gpu-memory-gb", "1e308"], "--gpu-memory-gb 1e+308: give the GPU's memory in GiB"),
    (["--gpu-memory-gb", "0"], "0.0 is not in the range x>0"),
    (["--context", "0"], "0 is not in the range x>=1"),
    (["--batch", "2", "-1"], "-1 is not in the range x>=1"),
    (["--kv-dtype", "int4"], "'int4' is not one of 'bf16', 'fp16', 'fp8'"),
])
def test_memory_command_bad_values_exit_2_without_a_traceback(llama3_8b, args, message):
    proc = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "memory", str(llama3_8b), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("config, message", [
    ([1, 2], "a JSON list, not an object"),
    ({**LLAMA3_8B, "num_attention_heads": 0}, "num_attention_heads must be at least 1"),
    ({**LLAMA3_8B, "num_hidden_layers": -2}, "not a positive size: layers -2"),
    ({**LLAMA3_8B, "num_key_value_heads": "eight"}, "invalid literal"),
    ({k: v for k, v in LLAMA3_8B.items() if k != "vocab_size"}, "missing key 'vocab_size'"),
])
def test_memory_command_bad_configs(tmp_path, config, message, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert cli("memory", str(path)) == 2
    err = capsys.readouterr().err
    assert "not a usable model config.json" in err and message in err, err


def test_memory_command_names_the_default_group_size_it_refuses(tmp_path, capsys):
    """`--bits 5` alone on a model 128 does not divide said "--group-size 128 does not
    divide", an option the user never gave (found by QA)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA3_8B, "hidden_size": 4000}))
    assert cli("memory", str(path), "--bits", "5") == 2
    err = capsys.readouterr().err
    assert "the default group size 128 does not divide the model's hidden_size 4000: give --group-size" in err, err


def test_report_memory_plan(tmp_path):
    """The report stage on two evaluations' metrics: memory_plan rows in metrics.json, the table,
    the plot."""
    from qlora_pipeline.graph import StageContext
    from qlora_pipeline.stages.report import run

    att = {"layers": 32, "kv_heads": 8, "head_dim": 128}
    inputs = {}
    for name, weights in (("merged", 16e9), ("gptq", 5.7e9)):
        out = tmp_path / name
        out.mkdir()
        out.joinpath("metrics.json").write_text(json.dumps({
            "artifact": name, "device": "cpu", "dtype": "float32", "domain_ppl": 10.0, "domain_tokens": 100.0,
            "size_bytes": weights, "weights_bytes": weights, "kv_shape": att, "kv_fp8_domain_ppl": 10.1,
            "kv_fp8_calibrated_domain_ppl": 10.05, "generations": []}))
        inputs[f"evaluate-{name}"] = out

    class NoMetrics:
        def log_metrics(self, *a, **k): ...
        def log_artifact(self, *a, **k): ...
        def set_tags(self, *a, **k): ...

    deploy = {"contexts": [2048, 8192], "batch_sizes": [1, 8, 32], "kv_dtypes": ["bf16", "fp8"], "gpu_memory_gb": 24}
    ctx = StageContext(name="report", config={"gate": {}, "seq_len": 512, "deploy": deploy}, inputs=inputs,
                       output_dir=tmp_path / "report", checkpoint_dir=tmp_path / "ckpt", metrics=NoMetrics(),
                       progress=lambda it, **kw: it, run_dir=tmp_path)
    ctx.output_dir.mkdir()
    run(ctx)
    report = json.loads((ctx.output_dir / "metrics.json").read_text())
    rows = report["memory_plan"]
    assert len(rows) == 2 * 2 * 3 * 2
    row = next(r for r in rows if (r["artifact"], r["context"], r["batch"], r["kv_dtype"]) == ("gptq", 8192, 8, "bf16"))
    assert row["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 2 * 8192 * 8 and row["weights_bytes"] == 5.7e9
    assert row["total_bytes"] == 5.7e9 + row["kv_cache_bytes"] and row["fits"] is True
    text = (ctx.output_dir / "report.md").read_text()
    assert "## Deployment memory" in text and "| gptq | 8192 | fp8 |" in text
    assert "Δ fp8 KV | Δ fp8 KV (calibrated) |" in text and "+1.00% | +0.50% |" in text
    assert (ctx.output_dir / "memory_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](memory_vs_context.png)" in text


def test_deploy_section_defaults_and_errors(write_recipe):
    from qlora_pipeline.errors import RecipeError
    from qlora_pipeline.recipe import load_recipe

    deploy = load_recipe(write_recipe({}))[0].deploy
    assert (deploy.contexts, deploy.batch_sizes, deploy.kv_dtypes, deploy.gpu_memory_gb) == (
        [2048, 8192], [1, 8, 32], ["bf16", "fp8"], 24)
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe({"deploy": {"contexts": [0], "kv_dtypes": ["int4"], "gpu_memory_gb": 0}}))
    assert sorted(p.split(":")[0] for p in err.value.problems) == [
        "deploy.contexts.0", "deploy.gpu_memory_gb", "deploy.kv_dtypes.0"]
    bad = {"contexts": [], "batch_sizes": [True, 2.5], "gpu_memory_gb": float("inf")}
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe({"deploy": bad}))
    assert sorted(p.split(":")[0] for p in err.value.problems) == [
        "deploy.batch_sizes.0", "deploy.batch_sizes.1", "deploy.contexts", "deploy.gpu_memory_gb"]
    with pytest.raises(RecipeError, match="deploy.gpu_memory_gb: must be a number of GiB, not true/false"):
        load_recipe(write_recipe({"deploy": {"gpu_memory_gb": True}}))
    with pytest.raises(RecipeError, match="deploy.gpu_memory_gb: Input should be a finite number"):
        load_recipe(write_recipe({"deploy": {"gpu_memory_gb": float("nan")}}))


def test_bad_deploy_values_are_a_clean_exit_2(tmp_path):
    """`pipeline validate` on a recipe with bad deploy values: the key paths, exit 2, no traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("deploy:\n  contexts: [4096, 0]\n  gpu_memory_gb: .inf\n  kv_dtypes: [int4]\n")
    proc = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "validate", str(recipe)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for key in ("deploy.contexts.1", "deploy.gpu_memory_gb", "deploy.kv_dtypes.0"):
        assert key in proc.stderr, proc.stderr
