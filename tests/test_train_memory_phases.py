"""scripts/train_memory_phases.py measures what the train stage trains: the run directory's own
LoRA settings and targets (not ones written into the script), through the stage's own code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import cli, tiny_recipe

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_memory_phases.py"


def test_phases_use_the_run_directory_recipe(tmp_path, tiny_llama_dir, write_recipe):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                         train={"gradient_checkpointing": False})
    assert cli("run", str(write_recipe(recipe)), "--only", "base") == 0
    base = tmp_path / "runs" / "tiny" / "base" / "output"
    out = tmp_path / "phases.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(base), "--seq-len", "32", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["lora"]["r"] == 4 and result["lora"]["alpha"] == 8
    assert result["target_modules"] == ["q_proj", "v_proj"]
    # What the model trained, not what the recipe says: r x (in + out) per adapted linear.
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    per_layer = 4 * (hidden + hidden) + 4 * (hidden + hidden // heads * kv_heads)
    assert result["trainable_parameters"] == config["num_hidden_layers"] * per_layer
    assert result["gradient_checkpointing"] is False
    assert [row["after"] for row in result["rows"]] == ["imports", "load", "attach lora", "forward 1",
                                                         "backward 1", "optimizer 1"]


def test_a_path_outside_a_run_directory_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a" / "b"), "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "run.json: not found" in done.stderr
    assert not (tmp_path / "o.json").exists()
