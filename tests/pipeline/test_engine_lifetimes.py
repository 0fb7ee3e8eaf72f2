"""The layer engine lets go of each piece of work as soon as it is done: a Hessian once its group
is quantized (before the next pass captures its own), a linear's float32 original once its
quantized weight replaced it, and everything of a layer before the next layer's transform (AWQ's
search, the peak of an AWQ stage). Held one step longer, the previous layer's down_proj Hessian
(0.8 GB), original and result (0.24 GB each) sat under the next layer's search: on 2 layers of
the 8B shape the AWQ stage peaked at 5.25 GiB with them and 4.15 without
(benchmarks/rehearsal_llama3-8b_awq_lifetimes.json).

Checked with weak references to the very tensors the engine hands the method (W, H) and gets
back (the result), at the moments the memory is needed again; no garbage collection is forced,
so a reference cycle that would keep them until the collector ran fails the test too."""
from __future__ import annotations

import re
import weakref

import pytest
import torch

from qlora_pipeline.layerwise import engine
from qlora_pipeline.layerwise.checkpoints import read_config
from qlora_pipeline.layerwise.families import LLAMA


class Lifetimes:
    """Weak references to what each call of the method received and returned, by layer."""

    def __init__(self):
        self.originals, self.hessians, self.results = [], [], []  # (layer, weakref)
        self.checks = {"transform": 0, "capture": 0, "forward": 0}

    @staticmethod
    def alive(refs, before_layer=None):
        return [i for i, r in refs if r() is not None and (before_layer is None or i < before_layer)]

    def quantize(self, name: str, W: torch.Tensor, H):
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        self.originals.append((layer, weakref.ref(W)))
        if H is not None:
            self.hessians.append((layer, weakref.ref(H)))
        Q = W.to(torch.bfloat16).float()  # any rounding: what is checked is the engine, not a method
        stored = Q.to(torch.bfloat16)
        self.results.append((layer, weakref.ref(Q)))
        self.results.append((layer, weakref.ref(stored)))
        return engine.LinearResult(Q, {"weight": stored}, {})


@pytest.mark.parametrize("true_sequential", [True, False], ids=["true-sequential", "one-pass"])
def test_each_hessian_original_and_layer_result_is_freed_before_the_memory_is_needed_again(
        tiny_llama_dir, tmp_path, monkeypatch, true_sequential):
    life = Lifetimes()
    vocab = read_config(tiny_llama_dir)["vocab_size"]
    ids = torch.randint(0, vocab, (12, 32), generator=torch.Generator().manual_seed(0))

    def transform(i, layer, hidden, pos_ids, pos_emb):
        # the next layer's search: nothing of any earlier layer may be held
        assert life.alive(life.originals + life.hessians + life.results, before_layer=i) == []
        life.checks["transform"] += 1
        return {}

    real_accumulate = engine.accumulate_hessian

    def accumulate(H, n, x):
        # a capture: every Hessian handed out so far belongs to an earlier pass or layer, and
        # every original handed out has been replaced by its quantized weight
        assert life.alive(life.hessians) == [] and life.alive(life.originals) == []
        life.checks["capture"] += 1
        return real_accumulate(H, n, x)

    real_forward = engine._forward

    def forward(layer, hidden, *args, **kwargs):
        # the next layer's inputs: the layer is quantized, its Hessians and originals are gone
        assert life.alive(life.hessians) == [] and life.alive(life.originals) == []
        life.checks["forward"] += 1
        return real_forward(layer, hidden, *args, **kwargs)

    monkeypatch.setattr(engine, "accumulate_hessian", accumulate)
    monkeypatch.setattr(engine, "_forward", forward)
    n_layers = engine.quantize_sequentially(
        tiny_llama_dir, ids, LLAMA, torch.bfloat16, tmp_path, life.quantize,
        lambda name, stored: stored["weight"].float(), true_sequential, lambda it, **k: it,
        lambda i, m: None, transform_layer=transform)

    # the checks ran, at moments where there was something to have freed
    assert life.checks["transform"] == n_layers >= 2
    assert life.checks["forward"] == n_layers
    assert life.checks["capture"] > n_layers * (len(LLAMA.sequential_groups) if true_sequential else 1)
    assert len(life.hessians) == n_layers * len(LLAMA.linears)
