"""QLoRA training and the merge on a tiny random Llama: resume after kill -9, standard formats."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli, tiny_recipe

TRAIN = {"steps": 12, "save_interval": 3, "eval_interval": 6, "warmup_steps": 2, "micro_batch_size": 2,
         "optimizer": "adamw", "learning_rate": 2e-3, "seq_len": 64}


def recipe_for(model_dir, tmp_path, name, **sections):
    r = tiny_recipe(model_dir, tmp_path, run={"name": name}, tracking={"enabled": False}, train=TRAIN,
                    lora={"r": 4, "alpha": 8, "dropout": 0.1})
    for k, v in sections.items():
        r[k] = {**r.get(k, {}), **v}
    return r


def pipeline_proc(recipe: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_pipeline.cli", "run", str(recipe), *extra], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """One uninterrupted run of the whole pipeline on the tiny model."""
    tmp = tmp_path_factory.mktemp("trained")
    import yaml

    path = tmp / "ref.yaml"
    path.write_text(yaml.safe_dump(recipe_for(tiny_llama_dir, tmp, "ref")))
    proc = pipeline_proc(path, tmp)
    assert proc.wait() == 0, proc.stderr.read()
    return tmp / "runs" / "ref"


def test_training_logs_every_step_and_eval(trained):
    log = json.loads((trained / "train" / "output" / "train_log.json").read_text())
    history = log["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    assert {"loss", "learning_rate", "grad_norm"} <= set(history[0])
    assert "tokens_per_second" not in history[0]  # timings go to MLflow: same work, same bytes
    assert [h["step"] for h in history if "eval_loss" in h] == [6, 12]
    assert all(math.isfinite(h["loss"]) for h in history)  # learning itself is shown on SmolLM2 (slow test)
    assert history[1]["learning_rate"] > history[0]["learning_rate"]  # warm-up
    assert not (trained / "train" / "checkpoints").exists()  # removed once the stage is done


def test_kill_9_during_training_resumes_to_the_same_adapter(trained, tiny_llama_dir, tmp_path, write_recipe):
    path = write_recipe(recipe_for(tiny_llama_dir, tmp_path, "killed"))
    ckpt = tmp_path / "runs" / "killed" / "train" / "checkpoints"
    proc = pipeline_proc(path, tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt.glob("step-*/complete")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(p.name for p in ckpt.glob("step-*") if (p / "complete").exists())
    assert steps and steps[-1] != "step-0000012", "the kill should land mid-training"
    assert not (tmp_path / "runs" / "killed" / "train" / "manifest.json").exists()
    proc = pipeline_proc(path, tmp_path)
    assert proc.wait() == 0, proc.stderr.read()
    ours = load_file(str(tmp_path / "runs" / "killed" / "train" / "output" / "adapter_model.safetensors"))
    ref = load_file(str(trained / "train" / "output" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-6, msg=k)


def kill_after_checkpoints(path: Path, cwd: Path, ckpt: Path, count: int) -> list[Path]:
    """Start a run, kill -9 it once `count` checkpoints are sealed; the sealed ones, oldest first."""
    proc = pipeline_proc(path, cwd)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpt.glob("step-*/complete"))) < count:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sorted(p.parent for p in ckpt.glob("step-*/complete"))


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_resume_still_matches(trained, tiny_llama_dir, tmp_path,
                                                                             write_recipe, damage):
    """A bit flipped in the newest checkpoint's weights used to resume silently from altered
    weights (a truncated one failed every run with a bare SafetensorError): the run now names
    the file, resumes from the intact checkpoint before it and still ends with the adapter of
    an uninterrupted run."""
    path = write_recipe(recipe_for(tiny_llama_dir, tmp_path, "damaged"))
    ckpt = tmp_path / "runs" / "damaged" / "train" / "checkpoints"
    sealed = kill_after_checkpoints(path, tmp_path, ckpt, 2)
    assert len(sealed) >= 2 and sealed[-1].name != "step-0000012", "the kill should land mid-training"
    weights = sealed[-1] / "adapter.safetensors"
    if damage == "truncate":
        os.truncate(weights, 100)
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) - 8] ^= 0x40  # in the tensor data, past the header
        weights.write_bytes(data)
    proc = pipeline_proc(path, tmp_path)
    assert proc.wait() == 0
    err = proc.stderr.read()
    assert f"checkpoint {sealed[-1].name} is damaged or incomplete" in err and "adapter.safetensors" in err, err
    assert f"resuming after step {int(sealed[-2].name.split('-')[1])}" in err, err
    ours = load_file(str(tmp_path / "runs" / "damaged" / "train" / "output" / "adapter_model.safetensors"))
    ref = load_file(str(trained / "train" / "output" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_adapter_loads_with_plain_peft_and_merged_loads_with_plain_transformers(trained, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained / "train" / "output"
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    with_adapter = PeftModel.from_pretrained(plain, adapter)
    assert sum("lora_A" in n for n, _ in with_adapter.named_parameters()) == 3 * 7

    merged_dir = trained / "merge" / "output"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (merged_dir / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    manifest = json.loads((trained / "merge" / "manifest.json").read_text())
    m = manifest["metrics"]
    # Merged bf16 vs NF4 base + adapter: only the bf16 rounding of the merged weights differs.
    assert m["verify_max_abs_logit_diff"] < 0.05 * max(m["verify_logit_scale"], 1e-3) + 1e-2


def test_merge_into_original_equals_plain_base_plus_adapter(trained, tiny_llama_dir, tmp_path, write_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained / "train" / "output"
    path = write_recipe(recipe_for(tiny_llama_dir, tmp_path, "orig", merge={"into": "original", "adapter": str(adapter)}))
    assert cli("run", str(path), "--only", "data") == 0
    assert cli("run", str(path), "--only", "base") == 0
    assert cli("run", str(path), "--only", "merge") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "orig" / "merge" / "output", dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), adapter)
    expected = reference.merge_and_unload().model.layers[2].mlp.down_proj.weight.to(torch.bfloat16).float()
    torch.testing.assert_close(merged.model.layers[2].mlp.down_proj.weight, expected, rtol=0, atol=0)
    assert not (tmp_path / "runs" / "orig" / "train").exists()  # merge.adapter skips training


def valid_ppl(run_dir: Path) -> float:
    """Perplexity of a run's merged model on the domain_valid windows (float32, the CPU)."""
    from qlora_pipeline import data
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.scoring import perplexity

    streams = load_file(str(run_dir / "data" / "output" / "tokens.safetensors"))
    windows = data.windows(streams["domain_valid"], 128, 4)  # tiny_recipe: seq_len 128, 4 domain windows
    model = load_hf_model(run_dir / "merge" / "output", torch.float32, "cpu")
    return perplexity(model, windows, 4, "cpu", lambda it, **_: it, "valid")[0]


def test_merge_into_auto_keeps_the_better_merge_and_says_why(trained, tiny_llama_dir, tmp_path, write_recipe):
    from safetensors.torch import load_file

    adapter = trained / "train" / "output"
    runs = {}
    for into in ("dequantized", "original", "auto"):
        path = write_recipe(recipe_for(tiny_llama_dir, tmp_path, into, merge={"into": into, "adapter": str(adapter)}),
                            f"{into}.yaml")
        for stage in ("data", "base", "merge", "evaluate-merged"):
            assert cli("run", str(path), "--only", stage) == 0
        runs[into] = tmp_path / "runs" / into
    choice = json.loads((runs["auto"] / "merge" / "output" / "merge_choice.json").read_text())
    # The choice is made on the validation split, never on the test split the report shows.
    assert choice["split"] == "domain_valid"
    ppl = {w: valid_ppl(runs[w]) for w in ("dequantized", "original")}
    # auto measured the same perplexities as evaluating each merge on domain_valid, and kept the lower one
    assert choice["domain_ppl"] == pytest.approx(ppl, rel=1e-5)
    assert choice["chosen"] == min(ppl, key=ppl.get) and choice["chosen"] in choice["reason"]
    kept = load_file(str(next((runs["auto"] / "merge" / "output").glob("model-00001-*"))))
    same = load_file(str(next((runs[choice["chosen"]] / "merge" / "output").glob("model-00001-*"))))
    assert kept.keys() == same.keys() and all(torch.equal(kept[k], same[k]) for k in kept)
    manifest = json.loads((runs["auto"] / "merge" / "manifest.json").read_text())
    assert manifest["info"]["into"] == choice["chosen"]


def test_external_adapter_on_a_prequantized_bnb_checkpoint(trained, tiny_llama_dir, tmp_path, write_recipe):
    """A base saved by transformers + bitsandbytes in 4-bit is kept as is and dequantized exactly."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    bnb_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=q, device_map="cpu")
    bnb_dir = tmp_path / "bnb-4bit"
    bnb_model.save_pretrained(bnb_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bnb_dir)

    adapter = trained / "train" / "output"
    path = write_recipe(recipe_for(bnb_dir, tmp_path, "prequant", merge={"adapter": str(adapter)}))
    assert cli("run", str(path), "--only", "data") == 0
    assert cli("run", str(path), "--only", "base") == 0
    assert cli("run", str(path), "--only", "merge") == 0
    merged = load_file(str(next((tmp_path / "runs" / "prequant" / "merge" / "output").glob("model-00002-*"))))
    layer = bnb_model.model.layers[1].mlp.up_proj
    state = layer.weight.quant_state
    state.dtype = torch.float32  # their dequantization in float32, as our merge computes before the bf16 cast
    dequant = bnb.functional.dequantize_4bit(layer.weight.data, state)
    a = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    delta = (a[f"{prefix}.lora_B.weight"].float() @ a[f"{prefix}.lora_A.weight"].float()) * (8 / 4)
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"].float(),
                               (dequant + delta).to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def loud_model_and_adapter(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama with its output head scaled so that its logits spread like a real
    model's (mean |logit| of several units, not 0.1), and a PEFT adapter on every linear whose
    LoRA B is random and large: the delta moves the weights by about half their own size, so
    a merge that loses or repeats it is far off, as it would be on a real model."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("loud")
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp / "model"))
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 40
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp / "adapter")
    return model_dir, tmp / "adapter"


@pytest.mark.parametrize("breakage", ["delta dropped", "delta doubled"])
def test_a_wrong_merge_fails_its_verification_and_publishes_nothing(breakage, loud_model_and_adapter, tmp_path,
                                                                    write_recipe, monkeypatch, capsys):
    from qlora_pipeline.recipe import MergeConfig
    from qlora_pipeline.stages import merge

    model_dir, adapter = loud_model_and_adapter
    path = write_recipe(recipe_for(model_dir, tmp_path, "verify", merge={"adapter": str(adapter)}))
    for stage in ("data", "base"):
        assert cli("run", str(path), "--only", stage) == 0
    real_delta = merge.Adapter.delta
    if breakage == "delta dropped":
        monkeypatch.setattr(merge.Adapter, "delta", lambda self, prefix: None)
    else:
        monkeypatch.setattr(merge.Adapter, "delta",
                            lambda self, prefix: None if (d := real_delta(self, prefix)) is None else 2 * d)
    capsys.readouterr()
    assert cli("run", str(path), "--only", "merge") == 1
    err = capsys.readouterr().err
    assert "merge verification failed" in err and "merge.verify_max_logit_diff" in err and "Traceback" not in err
    stage = tmp_path / "runs" / "verify" / "merge"
    assert not (stage / "manifest.json").exists() and not (stage / "output").exists()
    assert json.loads((stage / "state.json").read_text())["status"] == "failed"

    monkeypatch.undo()  # the same command with a correct merge: passes (not resumed from the wrong layers)
    assert cli("run", str(path), "--only", "merge") == 0
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    assert metrics["verify_max_abs_logit_diff"] <= MergeConfig().verify_max_logit_diff
    assert metrics["verify_logit_scale"] > 2  # the loud head: logits of a real model's size


def test_non_finite_loss_stops_with_a_clear_message(tiny_llama_dir, tmp_path, write_recipe, capsys):
    path = write_recipe(recipe_for(tiny_llama_dir, tmp_path, "nan", train={"learning_rate": 1e30, "max_grad_norm": 1e30}))
    assert cli("run", str(path)) == 1
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "train.learning_rate" in err
    state = json.loads((tmp_path / "runs" / "nan" / "train" / "state.json").read_text())
    assert state["status"] == "failed"


def test_training_under_accelerate_launch_with_two_cpu_processes(tiny_llama_dir, tmp_path, write_recipe):
    """Data parallel over 2 CPU processes (gloo): rank 0 alone writes manifests and checkpoints."""
    import shutil

    path = write_recipe(recipe_for(tiny_llama_dir, tmp_path, "ddp", train={"steps": 4, "save_interval": 2}))
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    proc = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "qlora_pipeline.cli", "run", str(path)],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["info"]["processes"] == 2
    log = json.loads((run_dir / "train" / "output" / "train_log.json").read_text())
    # 2 ranks x micro-batch 2 x 64 tokens per step
    assert log["processes"] == 2 and manifest["metrics"]["tokens_seen"] == 4 * 2 * 2 * 64
    assert not list((run_dir / "train").glob("output.rank*"))
    assert (run_dir / "report" / "manifest.json").is_file()
