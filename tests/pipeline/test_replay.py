"""Replaying finished modules in GPTQ's true-sequential passes: the same bytes, less work."""
from __future__ import annotations

import pytest
import torch


def _quantize(model_dir, ckpt, compute_dtype, calls=None):
    from qlora_pipeline.layerwise.checkpoints import read_config
    from qlora_pipeline.layerwise.engine import quantize_sequentially
    from qlora_pipeline.layerwise.families import LLAMA
    from qlora_pipeline.methods import gptq_format
    from qlora_pipeline.recipe import QuantizeEntry
    from qlora_quant.gptq import gptq_quantize

    entry = QuantizeEntry(name="g", method="gptq", group_size=32, desc_act=True, static_groups=True)
    vocab = read_config(model_dir)["vocab_size"]
    ids = torch.randint(0, vocab, (6, 64), generator=torch.Generator().manual_seed(0))  # 3 chunks of 2
    hessians = []

    def quantize(n, W, H):
        hessians.append(H)
        return gptq_format.pack(gptq_quantize(W, H, 4, 32, act_order=True, static_groups=True,
                                              scale_dtype=torch.float16), entry, H)

    ckpt.mkdir()
    quantize_sequentially(model_dir, ids, LLAMA, torch.bfloat16, ckpt, quantize,
                          lambda n, s: gptq_format.restore(s, 4), True, lambda it, **k: it, lambda i, m: None,
                          chunk=2, compute_dtype=compute_dtype)
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}, hessians


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_replayed_modules_give_the_same_bytes_and_skip_their_work(tiny_llama_dir, tmp_path, monkeypatch,
                                                                   compute_dtype):
    from qlora_pipeline.layerwise import replay
    from transformers.models.llama import modeling_llama

    runs = {}
    for mode in ("replayed", "recomputed"):
        if mode == "recomputed":
            monkeypatch.setattr(replay.LayerReplays, "capture_for", lambda self, linears: set())
        counts = {"attention": 0, "mlp": 0}
        for cls, key in ((modeling_llama.LlamaAttention, "attention"), (modeling_llama.LlamaMLP, "mlp")):
            real = cls.forward

            def counted(self, *a, real=real, key=key, **k):
                counts[key] += 1
                return real(self, *a, **k)
            monkeypatch.setattr(cls, "forward", counted)
        runs[mode] = (*_quantize(tiny_llama_dir, tmp_path / mode, compute_dtype), counts)
        monkeypatch.undo()

    shards, hessians, counts = runs["replayed"]
    ref_shards, ref_hessians, ref_counts = runs["recomputed"]
    assert shards == ref_shards  # every layer's packed tensors, byte for byte
    assert all(torch.equal(a, b) for a, b in zip(hessians, ref_hessians)) and len(hessians) == len(ref_hessians)
    # Calls per layer and chunk (a capture that stops at a linear inside a module counts as a
    # call). Recomputed: attention in all five passes (q/k/v, o, gate/up, down, output), the
    # MLP in three (gate/up, down, output). Replayed: attention in the q/k/v and o passes only,
    # the MLP in the gate/up and down passes only.
    layers_chunks = ref_counts["mlp"] // 3
    assert ref_counts == {"attention": 5 * layers_chunks, "mlp": 3 * layers_chunks}
    assert counts == {"attention": 2 * layers_chunks, "mlp": 2 * layers_chunks}


def test_no_replay_without_room(tiny_llama_dir, tmp_path, monkeypatch):
    """Inputs that would not fit a quarter of the available memory are not kept: the modules
    are recomputed, with the same result."""
    from qlora_pipeline.layerwise import replay

    monkeypatch.setattr(replay, "available_memory_bytes", lambda device=None: 0)
    kept = []
    real_keep = replay.LayerReplays.keep
    monkeypatch.setattr(replay.LayerReplays, "keep", lambda self, lin, x: kept.append(lin) or real_keep(self, lin, x))
    _quantize(tiny_llama_dir, tmp_path / "q", torch.float32)
    assert kept == []
