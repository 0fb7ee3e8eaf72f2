"""The layer-at-a-time runner gives the model's own logits."""
from __future__ import annotations

from functools import partial

import torch

from qlora_pipeline.layerwise.checkpoints import read_config, read_prefix, weight_map
from qlora_pipeline.layerwise.families import LLAMA
from qlora_pipeline.layerwise.runner import LayerwiseRunner


def test_layerwise_logits_equal_the_full_forward(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    wmap = weight_map(tiny_llama_dir)
    ids = torch.randint(0, 5000, (2, 40))
    runner = LayerwiseRunner(read_config(tiny_llama_dir), torch.float32, LLAMA)
    ours = runner.logits(ids, partial(read_prefix, wmap))
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = full(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "meta" for p in runner.layers.parameters())  # nothing kept
