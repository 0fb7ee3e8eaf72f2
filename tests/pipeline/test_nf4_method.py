"""`method: nf4`: the merged model in NF4 with double quantization, written as the base stage
writes it, loaded by plain transformers + bitsandbytes on the CPU with the perplexity our own
evaluation measures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_pipeline import methods
from qlora_pipeline.recipe import NF4Config, QuantizeEntry

# Run in a fresh interpreter outside the repository: no module of ours can be imported there.
PLAIN_TRANSFORMERS = """
import json, math, sys
import torch, bitsandbytes as bnb
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu").eval()
windows = load_file(sys.argv[2])["windows"]
with torch.no_grad():
    logits = model(input_ids=windows).logits.float()
nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
print(json.dumps({"ppl": math.exp(nll.item()),
                  "linear4bit": isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit),
                  "ours": sorted(m for m in sys.modules if m.startswith(("qlora", "pipeline", "kernels", "quant")))}))
"""


@pytest.fixture(scope="module")
def nf4_checkpoint(tiny_llama_dir, tmp_path_factory):
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint

    tmp = tmp_path_factory.mktemp("nf4")
    (tmp / "ckpt").mkdir()
    (tmp / "out").mkdir()
    done = quantize_checkpoint(tiny_llama_dir, None, QuantizeEntry(name="nf4", method="nf4"), torch.bfloat16,
                               tmp / "ckpt", tmp / "out", lambda it, **kw: it, lambda i, m: None)
    assert done.checkpoint_format == "bnb-nf4" and done.n_layers == 3
    assert all("down_proj.weight_rel_err" in row for row in done.layer_metrics)
    return tmp / "out"


def test_written_byte_for_byte_as_the_base_stage_writes_nf4(nf4_checkpoint, tiny_llama_dir):
    from qlora_pipeline.layerwise.checkpoints import bnb_quantization_config, read_tensors, weight_map
    from qlora_pipeline.layerwise.families import LLAMA
    from qlora_pipeline.stages.base import quantize_layer

    config = json.loads((nf4_checkpoint / "config.json").read_text())
    assert config["quantization_config"] == bnb_quantization_config(NF4Config())
    ours = read_tensors(weight_map(nf4_checkpoint), weight_map(nf4_checkpoint))
    source = weight_map(tiny_llama_dir)
    linears = {LLAMA.layer_prefix(i) + f"{lin}.weight" for i in range(3) for lin in LLAMA.linears}
    base = quantize_layer(read_tensors(source, source), linears, torch.bfloat16, NF4Config().blocksize)
    assert sorted(ours) == sorted(base)
    for name, t in base.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def test_plain_transformers_loads_it_with_our_evaluations_perplexity(nf4_checkpoint, tmp_path):
    from qlora_pipeline.layerwise.checkpoints import load_nf4_model
    from qlora_pipeline.scoring import perplexity

    assert methods.METHODS["nf4"].loader() is load_nf4_model  # how the evaluation stage loads `nf4` artifacts
    windows = torch.randint(0, 5000, (4, 64))
    save_file({"windows": windows}, str(tmp_path / "windows.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(nf4_checkpoint), str(tmp_path / "windows.safetensors")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["linear4bit"] and theirs["ours"] == []
    ours, _ = perplexity(load_nf4_model(nf4_checkpoint, torch.float32, "cpu"), windows, 4, "cpu", lambda it, **kw: it, "")
    assert abs(theirs["ppl"] / ours - 1) < 0.005, (theirs["ppl"], ours)


def test_nf4_recipe_rules():
    entry = QuantizeEntry(name="nf4", method="nf4", nf4={"blocksize": 128})
    settings = methods.relevant_settings(entry)
    assert settings == {"name": "nf4", "method": "nf4", "nf4": {"blocksize": 128, "double_quant": True,
                                                                "compute_dtype": "bfloat16"}}
    assert QuantizeEntry.model_validate(settings) == entry  # what the quantize stage rebuilds from its config
    assert not methods.METHODS["nf4"].calibrated
    with pytest.raises(ValueError, match="does not use group_size, sym"):
        QuantizeEntry(name="nf4", method="nf4", group_size=64, sym=True)
    with pytest.raises(ValueError, match="does not use bits"):
        QuantizeEntry(name="nf4", method="nf4", bits=8)
    methods.check_shapes(entry, {"hidden_size": 100, "intermediate_size": 300}, "quantize.0")  # any shape
    assert "nf4" not in methods.relevant_settings(QuantizeEntry(name="g", method="gptq"))


def test_nf4_stage_needs_no_calibration(tiny_llama_dir, tmp_path, write_recipe):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(tiny_llama_dir, tmp_path)
    recipe["quantize"] = [{"name": "nf4", "method": "nf4"}]
    specs = {s.name: s for s in build_stages(load_recipe(write_recipe(recipe))[0])}
    assert "calibrate" not in specs and specs["quantize-nf4"].deps == ("merge",)
    assert specs["evaluate-nf4"].deps == ("data", "quantize-nf4")
