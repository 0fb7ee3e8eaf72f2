"""`method: nf4`: the merged model in NF4 with double quantization, written as the base stage
writes it, loaded by plain transformers + bitsandbytes on the CPU with the logits our own
evaluation computes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_pipeline import methods
from qlora_pipeline.recipe import NF4Config, QuantizeEntry

# Run in a fresh interpreter outside the repository: no module of ours can be imported there.
# It saves the logits of plain transformers + bitsandbytes, and bitsandbytes' own dequantization
# of one serialized weight (from the file: bitsandbytes >= 0.48 repacks the weights it loads on
# the CPU into a layout of its own kernels).
PLAIN_TRANSFORMERS = """
import json, sys
import torch, bitsandbytes as bnb
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

OURS = {"qlora_pipeline", "qlora_quant", "qlora_kernels", "pipeline", "quant"}  # `kernels`: Hugging Face's
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu").eval()
with torch.no_grad():
    logits = model(input_ids=load_file(sys.argv[2])["windows"]).logits.float()
name = "model.layers.1.mlp.down_proj.weight"
shard = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))["weight_map"][name]
tensors = load_file(sys.argv[1] + "/" + shard)
state = bnb.functional.QuantState.from_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")},
                                            torch.device("cpu"))
save_file({"logits": logits.contiguous(), "down_proj": bnb.functional.dequantize_4bit(tensors[name], state).float()},
          sys.argv[3])
print(json.dumps({"linear4bit": isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit),
                  "ours": sorted(m for m in sys.modules if m.split(".")[0] in OURS)}))
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


def test_plain_transformers_loads_it_with_our_evaluations_logits(nf4_checkpoint, tiny_llama_dir, tmp_path):
    """transformers + bitsandbytes, with no module of ours, compute with the NF4 weights our
    evaluation computes with: bitsandbytes dequantizes the file to our weights exactly, and its
    logits are those of our evaluation's model up to bf16 arithmetic, far closer than the NF4
    rounding moves them."""

    from qlora_pipeline.layerwise.checkpoints import load_hf_model, load_nf4_model
    from qlora_pipeline.scoring import perplexity

    assert methods.METHODS["nf4"].loader() is load_nf4_model  # how the evaluation stage loads `nf4` artifacts
    windows = torch.randint(0, 5000, (4, 64))
    save_file({"windows": windows}, str(tmp_path / "windows.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(nf4_checkpoint), str(tmp_path / "windows.safetensors"),
                           str(tmp_path / "theirs.safetensors")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["linear4bit"] and info["ours"] == []
    theirs = load_file(str(tmp_path / "theirs.safetensors"))

    model = load_nf4_model(nf4_checkpoint, torch.float32, "cpu")
    assert torch.equal(theirs["down_proj"], model.model.layers[1].mlp.down_proj.dequantized_weight().float())
    with torch.no_grad():
        ours = model(input_ids=windows).logits.float()
        unquantized = load_hf_model(tiny_llama_dir, torch.float32, "cpu")(input_ids=windows).logits.float()
    # transformers computes in the checkpoint's bnb_4bit_compute_dtype (bf16), we in float32.
    torch.testing.assert_close(theirs["logits"], ours, rtol=0, atol=0.02)
    library = (theirs["logits"] - ours).abs().mean()
    rounding = (unquantized - ours).abs().mean()  # what NF4 changes: a model loaded without it would be this far
    assert library < rounding / 10, (library, rounding)

    def ppl(logits):  # the mean in float64: a float32 mean of 252 losses is itself off by ~1e-6
        return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                          windows[:, 1:].reshape(-1)).item())

    evaluation, _ = perplexity(model, windows, 4, "cpu", lambda it, **kw: it, "")
    assert evaluation == pytest.approx(ppl(ours), rel=1e-6)
    assert ppl(theirs["logits"]) == pytest.approx(evaluation, rel=1e-3)


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
