"""`method: int8`: LLM.int8 of the merged model, byte for byte what transformers + bitsandbytes
save for the same weights, evaluated through bitsandbytes' own int8 arithmetic on the CPU."""
from __future__ import annotations

import json

import torch

from qlora_pipeline.recipe import QuantizeEntry


def test_int8_checkpoint_is_what_transformers_saves_and_evaluates(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_pipeline.layerwise.checkpoints import load_hf_model, read_tensors, weight_map
    from qlora_pipeline.methods import METHODS
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.scoring import perplexity

    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    (tmp_path / "ckpt").mkdir()
    ours_dir.mkdir()
    done = quantize_checkpoint(tiny_llama_dir, None, QuantizeEntry(name="int8", method="int8"), torch.bfloat16,
                               tmp_path / "ckpt", ours_dir, lambda it, **kw: it, lambda i, m: None)
    assert done.checkpoint_format == "bnb-int8"
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                  device_map="cpu", dtype=torch.bfloat16)
    theirs.save_pretrained(theirs_dir)
    del theirs
    assert (json.loads((ours_dir / "config.json").read_text())["quantization_config"]
            == json.loads((theirs_dir / "config.json").read_text())["quantization_config"])
    ours_t = read_tensors(weight_map(ours_dir), weight_map(ours_dir))
    theirs_t = {k: v for f in theirs_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert sorted(ours_t) == sorted(theirs_t)
    for name, t in theirs_t.items():
        assert ours_t[name].dtype == t.dtype and torch.equal(ours_t[name], t), name

    model = METHODS["int8"].loader()(ours_dir, torch.float32, "cpu")  # the evaluation's loader
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    windows = torch.randint(0, 5000, (4, 64))
    int8, _ = perplexity(model, windows, 4, "cpu", lambda it, **kw: it, "")
    bf16, _ = perplexity(load_hf_model(tiny_llama_dir, torch.float32, "cpu"), windows, 4, "cpu", lambda it, **kw: it, "")
    assert abs(int8 / bf16 - 1) < 0.01, (int8, bf16)
