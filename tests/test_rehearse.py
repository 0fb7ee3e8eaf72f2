"""scripts/rehearse.py: the streamed checkpoint is a valid sharded HF checkpoint of the exact
shape, the computed memory figures add up (fast: a toy shape, no pipeline run), and the whole
rehearsal runs end to end on a toy shape (slow)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rehearse():
    spec = importlib.util.spec_from_file_location("rehearse", REPO / "scripts" / "rehearse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rehearse"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("rehearse", None)


def test_checkpoint_is_sharded_exact_and_loadable(rehearse, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "rehearsal_tokenizer.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    monkeypatch.setattr(rehearse, "SHARD_LIMIT", 40 * 2**20)  # force several shards
    shape = rehearse.SHAPES["tiny"]
    info = rehearse.write_checkpoint(tmp_path / "m", shape, 3, tok)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert info["shards"] == len(files) > 1
    assert index["metadata"]["total_size"] == info["bytes"] == info["params"] * 2
    assert info["params"] == shape.total_params(3)
    for f in files:
        with safe_open(str(tmp_path / "m" / f), "pt") as st:
            for name in st.keys():
                assert index["weight_map"][name] == f
                assert st.get_slice(name).get_dtype() == "BF16"
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert (config.vocab_size, config.num_key_value_heads, config.tie_word_embeddings) == (128256, 2, False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    w = model.model.layers[2].mlp.down_proj.weight
    assert tuple(w.shape) == (128, 256) and 0.015 < w.float().std().item() < 0.025
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.bfloat16))
    # the same bytes on a second write
    rehearse.write_checkpoint(tmp_path / "m2", shape, 3, tok)
    assert (tmp_path / "m" / files[0]).read_bytes() == (tmp_path / "m2" / files[0]).read_bytes()


def test_llama3_8b_figures(rehearse):
    shape = rehearse.SHAPES["llama3-8b"]
    assert shape.total_params() == 8_030_261_248  # Meta-Llama-3-8B
    recipe = yaml.safe_load((REPO / "recipes" / "llama3_domain.yaml").read_text())
    ev = rehearse.gpu_estimate("evaluate-base", shape, recipe)
    assert ev["parts_gib"]["weights"] * 2**30 == pytest.approx(shape.total_params() * 2)
    # the head and the loss over 1,024 positions at a time (scoring.summed_nll): bf16 logits,
    # their fp32 copy and fp32 log-softmax, 10 bytes an entry; the KV cache of the fp8-KV
    # perplexities (evaluate.kv_fp8 is on), batch 4 x 2048
    assert ev["parts_gib"]["activations_or_logits"] * 2**30 == 1024 * 128256 * 10
    assert ev["parts_gib"]["kv_cache"] * 2**30 == 2 * 32 * 4 * 2048 * 1024 * 2
    assert rehearse.gpu_estimate("quantize-gptq-w4g128", shape, recipe)["bytes"] == 0
    train = rehearse.gpu_estimate("train", shape, recipe)
    assert 8 < train["gib"] < 16
    # docs/rehearsal.md's tables, part by part (recipe: micro batch 1 x 2048, r 16 all-linear,
    # paged_adamw_8bit, gradient checkpointing, NF4 blocksize 64; evaluation 4 x 2048 in bf16)
    d, f, L, V, dkv, T = 4096, 14336, 32, 128256, 1024, 2048
    p_layer = 2 * d * d + 2 * d * dkv + 3 * d * f
    p_rest = 2 * V * d + (2 * L + 1) * d
    nf4 = 0.5 + 1 / 64 + 4 / (256 * 64)
    p_lora = L * 16 * (2 * d + 2 * d + 2 * (d + dkv) + 3 * (d + f))
    assert p_lora == 41_943_040
    expected = {"weights": L * p_layer * nf4 + p_rest * 2, "lora_params_grads_optimizer": p_lora * (4 + 4 + 2),
                "saved_hidden": L * T * d * 2, "one_layer_recompute_and_backward": 2 * T * (50 * d + 6 * dkv + 13 * f),
                "logits_loss_and_grad": 256 * V * 8 + (T - 1) * d * 2, "dequantized_linear": d * f * 2}
    assert {k: v * 2**30 for k, v in train["parts_gib"].items()} == pytest.approx(expected)
    assert round(train["gib"], 2) == 8.09
    assert round(ev["gib"], 2) == 17.18  # bf16 base/merged on a 24 GB card (docs/rehearsal.md)
    assert round(rehearse.gpu_estimate("evaluate-base-nf4", shape, recipe)["gib"], 2) == 7.64
    assert round(rehearse.gpu_estimate("evaluate-gptq-w4g128", shape, recipe)["gib"], 2) == 7.67
    # the layer engine's calibration activations: samples x seq_len x hidden x 4 bytes, held once
    # (outputs written over inputs: tests/pipeline/test_engine_device.py)
    gptq = rehearse.host_estimate("quantize-gptq-w4g128", shape, recipe)
    h = 256 * 2048 * d * 4
    assert h == 8 * 2**30
    layer = h + p_layer * 6 + 3 * f * f * 4 + 8 * T * (3 * f + 4 * d) * 4
    assert gptq["phases_gib"]["layer"] * 2**30 == pytest.approx(layer) and round(gptq["gib"], 2) == 15.14
    one = replace(shape, layers=1)
    assert rehearse.tensor_plan(one, 1)[-1] == ("lm_head.weight", (128256, 4096))


def test_dry_run_prints_the_plan(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "rehearse.py"), "--shape", "llama3-8b", "--dry-run",
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "override train.optimizer = \"adamw\"" in out.stdout
    assert "evaluate-base " in out.stdout and "GPU" in out.stdout
    # the shared AWQ search is a stage too; the layer engine's stages run on a GPU when there is
    # one, so the dry run does not call them CPU stages (their need is the placement plan's)
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ") and " GPU " in line}
    assert "awq-search-w4g128" in rows
    assert "layer engine" in rows["quantize-gptq-w4g128"] and "runs on CPU" not in rows["quantize-gptq-w4g128"]
    assert "runs on CPU" in rows["merge"]
    assert not (tmp_path / "w" / "model").exists()


@pytest.mark.slow  # 11 stage processes, each starting torch, transformers and MLflow: over 2 min on 2 cores
def test_end_to_end_on_a_tiny_shape(tmp_path):
    """The whole rehearsal (checkpoint, then every stage of the llama3 recipe in its own process,
    one quantizer) on the toy Llama (2 layers, 128k vocab): a record per planned stage with wall
    time, peak RSS, disk and the computed GPU figure, all stages finished."""
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "rehearse.py"), "--shape", "tiny", "--layers", "2",
                           "--quantizers", "gptq-w4g128", "--workdir", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["layers"], result["partial_depth"], result["checkpoint"]["layers"]) == (2, False, 2)
    stages = [r["stage"] for r in result["stages"]]
    assert stages == ["data", "base", "evaluate-base", "evaluate-base-nf4", "train", "merge", "evaluate-merged",
                      "calibrate", "quantize-gptq-w4g128", "evaluate-gptq-w4g128", "report"]
    for r in result["stages"]:
        assert r["returncode"] == 0, r
        assert r["wall_seconds"] > 0 and r["peak_rss_bytes"] > 100 * 2**20
        assert 0 < r["cpu_seconds"] < r["wall_seconds"] * (os.cpu_count() or 1) + 1  # the stage's process tree
        assert r["stage_dir_peak_bytes"] >= r["output_bytes"] > 0
        g = r["gpu_estimate"]
        assert g["on_gpu"] == (r["stage"] == "train" or r["stage"].startswith("evaluate-"))
        assert (g["bytes"] > 0) == g["on_gpu"]
    assert result["stages"][stages.index("quantize-gptq-w4g128")]["host_ram_estimate_real_settings"]["bytes"] > 0
    assert "quantize-gptq-w4g128" in proc.stdout and "GPU GiB (computed)" in proc.stdout  # the table
    assert not (tmp_path / "w").exists()  # removed when every stage finished (no --keep)


@pytest.mark.slow  # 7 stage processes: about 2 min on 2 cores
def test_a_rehearsal_in_parts_keeps_every_parts_records(tmp_path):
    """`--resume --stages X` runs X and keeps the records of the stages an earlier part ran
    (they are not rerun, and not dropped from the JSON)."""
    out, work = tmp_path / "rehearsal.json", tmp_path / "w"
    common = [sys.executable, str(REPO / "scripts" / "rehearse.py"), "--shape", "tiny", "--layers", "1",
              "--quantizers", "gptq-w4g128", "--workdir", str(work), "--out", str(out), "--keep"]
    first = subprocess.run(common + ["--stages", "data", "base", "train", "merge", "calibrate"],
                           capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = {r["stage"]: r for r in json.loads(out.read_text())["stages"]}
    assert list(before) == ["data", "base", "train", "merge", "calibrate"]
    second = subprocess.run(common + ["--resume", "--stages", "quantize-gptq-w4g128"],
                            capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = {r["stage"]: r for r in json.loads(out.read_text())["stages"]}
    assert list(after) == ["data", "base", "train", "merge", "calibrate", "quantize-gptq-w4g128"]
    for stage, record in before.items():
        assert after[stage]["wall_seconds"] == record["wall_seconds"]  # kept, not rerun
    assert after["quantize-gptq-w4g128"]["returncode"] == 0


def test_a_run_under_way_keeps_the_records_of_the_stages_it_has_not_reached(rehearse):
    """The JSON written after each stage of a `--resume` run: the stages run so far, and the earlier
    records of the later stages, in plan order (before, a run killed half-way dropped the later ones)."""
    plan = ["data", "base", "evaluate-base", "train", "merge", "quantize-gptq-w4g128", "report"]
    previous = {s: {"stage": s, "wall_seconds": 1.0} for s in ("data", "base", "train", "merge", "quantize-gptq-w4g128")}
    records = [previous["data"], previous["base"], {"stage": "evaluate-base", "wall_seconds": 2.0}]  # just ran
    written = rehearse.records_so_far(plan, records, previous)
    assert [r["stage"] for r in written] == ["data", "base", "evaluate-base", "train", "merge", "quantize-gptq-w4g128"]
    assert written[2]["wall_seconds"] == 2.0
    rerun = records + [previous["train"], {"stage": "merge", "wall_seconds": 3.0}]  # merge ran again: the new record
    assert [r["wall_seconds"] for r in rehearse.records_so_far(plan, rerun, previous)] == [1.0, 1.0, 2.0, 1.0, 3.0, 1.0]
