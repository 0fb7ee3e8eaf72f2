"""`dtype: auto`, and the layer engine's calibration forwards in bf16."""
from __future__ import annotations

import pytest
import torch

from qlora_pipeline import compute


def test_auto_is_bf16_on_cuda_and_float32_on_the_cpu():
    assert compute.auto_dtype("cpu") == torch.float32
    assert compute.auto_dtype("cuda") == torch.bfloat16
    assert compute.auto_dtype("cuda", cuda_dtype=torch.float16) == torch.float16
    assert compute.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert compute.resolve_dtype("float32", "cuda") == torch.float32


def test_compute_context_autocasts_matmuls_only_below_float32():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with compute.compute_context(torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with compute.compute_context(torch.float32):
        assert (a @ b).dtype == torch.float32


def test_the_engine_in_bf16_quantizes_close_to_float32(tiny_llama_dir, tmp_path):
    """Same calibration, forwards in bf16 or fp32: the Hessians stay float32 and close."""
    from qlora_pipeline.layerwise.checkpoints import read_config
    from qlora_pipeline.layerwise.engine import quantize_sequentially
    from qlora_pipeline.layerwise.families import LLAMA
    from qlora_pipeline.methods import gptq_format
    from qlora_pipeline.recipe import QuantizeEntry
    from qlora_quant.gptq import gptq_quantize

    entry = QuantizeEntry(name="g", method="gptq", group_size=32)
    vocab = read_config(tiny_llama_dir)["vocab_size"]
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    seen: dict[str, list] = {"float32": [], "bfloat16": []}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        def quantize(n, W, H, name=name):
            assert H.dtype == torch.float32
            seen[name].append(H)
            return gptq_format.pack(gptq_quantize(W, H, 4, 32, scale_dtype=torch.float16), entry, H)
        ckpt = tmp_path / name
        ckpt.mkdir()
        quantize_sequentially(tiny_llama_dir, ids, LLAMA, torch.bfloat16, ckpt, quantize,
                              lambda n, s: gptq_format.restore(s, 4), True, lambda it, **k: it, lambda i, m: None,
                              compute_dtype=dtype)
    # q/k/v of the first layer read the normed embeddings: no matmul before them, the same Hessian.
    assert torch.allclose(seen["float32"][0], seen["bfloat16"][0], rtol=1e-5, atol=1e-6)
    drift = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(seen["float32"], seen["bfloat16"])]
    assert 0 < max(drift) < 0.1  # later inputs went through bf16 matmuls, and stay close
