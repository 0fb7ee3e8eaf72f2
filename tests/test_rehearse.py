"""scripts/rehearse.py: the streamed checkpoint is a valid sharded HF checkpoint of the exact
shape, and the computed memory figures add up (fast: a toy shape, no pipeline run)."""
from __future__ import annotations

import importlib.util
import json
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
    # batch 4 x 2048 x 128256 logits, 12 bytes an entry in perplexity()
    assert ev["parts_gib"]["activations_or_logits"] * 2**30 == 4 * 2048 * 128256 * 12
    assert rehearse.gpu_estimate("quantize-gptq-w4g128", shape, recipe)["bytes"] == 0
    train = rehearse.gpu_estimate("train", shape, recipe)
    assert 8 < train["gib"] < 16
    one = replace(shape, layers=1)
    assert rehearse.tensor_plan(one, 1)[-1] == ("lm_head.weight", (128256, 4096))


def test_dry_run_prints_the_plan(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "rehearse.py"), "--shape", "llama3-8b", "--dry-run",
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "override train.optimizer = \"adamw\"" in out.stdout
    assert "evaluate-base " in out.stdout and "GPU" in out.stdout
    assert not (tmp_path / "w" / "model").exists()
