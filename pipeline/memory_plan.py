"""Deployment memory: weights + KV cache for each context and batch, against one GPU's memory.

Pure arithmetic on a model's `config.json` (no torch, no weights): `pipeline memory` uses it
to size a model before downloading it, the report uses it for every evaluated artifact (with
the weight bytes of the checkpoint itself).

    KV cache bytes = 2 (K and V) x layers x kv_heads x head_dim x bytes per element x context x batch

Grouped-query attention counts `num_key_value_heads`, not `num_attention_heads`. What it
leaves out: activations and temporary buffers of the forward, the CUDA context and the
framework's own allocations, allocator fragmentation, and a server's block granularity
(vLLM allocates the cache in blocks of 16 tokens and reserves a fraction of the GPU up front).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from qlora_pipeline.safetensors_header import read_header

KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}  # bytes per cached element
FLOAT_BYTES = 2                            # embeddings, head, norms and unquantized linears: bf16
SCALE_BYTES = 2                            # one fp16 scale per group and output column
GIB = 2**30
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class Attention(NamedTuple):
    """What the KV cache depends on."""

    layers: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES[kv_dtype]


def attention(config: dict) -> Attention:
    """The KV-cache shape of a (decoder-only, Llama-style) model config."""
    heads = int(config["num_attention_heads"])
    if heads < 1:
        raise ValueError(f"num_attention_heads must be at least 1, got {heads}")
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
    att = Attention(int(config["num_hidden_layers"]), int(config.get("num_key_value_heads") or heads), int(head_dim))
    bad = [f"{k} {v}" for k, v in att._asdict().items() if v < 1]
    if bad:
        raise ValueError(f"not a positive size: {', '.join(bad)}")
    return att


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear of every decoder layer (Llama, Mistral, Qwen2)."""
    for key in _EXPERT_KEYS:
        if int(config.get(key) or 0) > 1:
            raise ValueError(f"mixture-of-experts configs ({key}: {config[key]}) are not supported; "
                             "dense Llama-style models only")
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    att = attention(config)
    q_out = int(config["num_attention_heads"]) * att.head_dim
    kv_out = att.kv_heads * att.head_dim
    layer = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden),
             (hidden, inter), (hidden, inter), (inter, hidden)]
    return layer * att.layers


def quantized_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Packed codes, one fp16 scale and one packed zero point per group and output column."""
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    codes = math.ceil(in_features * out_features * bits / 8)
    zeros = math.ceil(groups * out_features * bits / 8)
    return codes + groups * out_features * SCALE_BYTES + zeros


def estimated_weight_bytes(config: dict, bits: int = 16, group_size: int = 128) -> int:
    """Weight bytes from the config's shapes: the decoder linears in `bits` (16: plain bf16) with
    `group_size` columns per group (-1: one group per row); embeddings, head, norms (and
    biases) in bf16. A tied head is stored once."""
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    linears = linear_shapes(config)
    layers = attention(config).layers
    if bits >= 16:
        linear_bytes = sum(i * o for i, o in linears) * FLOAT_BYTES
    else:
        linear_bytes = sum(quantized_linear_bytes(i, o, bits, group_size) for i, o in linears)
    biases = 0
    if config.get("attention_bias"):
        biases += sum(o for _, o in linears[:4])  # q, k, v, o of one layer
    if config.get("mlp_bias"):
        biases += sum(o for _, o in linears[4:7])
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    norms = (2 * layers + 1) * hidden
    return linear_bytes + (embeddings + norms + biases * layers) * FLOAT_BYTES


def kv_cache_bytes(att: Attention, context: int, batch: int, kv_dtype: str) -> int:
    return att.kv_bytes_per_token(kv_dtype) * context * batch


def max_batch(att: Attention, weights_bytes: int, context: int, kv_dtype: str, gpu_bytes: int) -> int:
    """The largest batch of `context`-token sequences whose KV cache fits beside the weights (0: none)."""
    free = gpu_bytes - weights_bytes
    return max(0, free // (att.kv_bytes_per_token(kv_dtype) * context)) if free > 0 else 0


def plan_rows(artifact: str, att: Attention, weights_bytes: int, contexts, batch_sizes, kv_dtypes,
              gpu_memory_gb: float) -> list[dict]:
    """One row per (context, batch, KV dtype): weights, KV cache, total, whether it fits
    `gpu_memory_gb` GiB, and the largest batch that fits at that context and KV dtype."""
    gpu = int(gpu_memory_gb * GIB)
    rows = []
    for context in contexts:
        for kv_dtype in kv_dtypes:
            largest = max_batch(att, weights_bytes, context, kv_dtype, gpu)
            for batch in batch_sizes:
                kv = kv_cache_bytes(att, context, batch, kv_dtype)
                rows.append({"artifact": artifact, "context": context, "batch": batch, "kv_dtype": kv_dtype,
                             "weights_bytes": weights_bytes, "kv_cache_bytes": kv, "total_bytes": weights_bytes + kv,
                             "fits": weights_bytes + kv <= gpu, "max_batch": largest})
    return rows


def render(rows: list[dict], gpu_memory_gb: float) -> list[str]:
    """A markdown table, a line per (artifact, context, KV dtype): weights, the total at each batch
    size (GiB, "(over)" where it exceeds the GPU) and the largest batch that fits."""
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    lines = ["| artifact | context | KV dtype | weights (GiB) | " + " | ".join(f"total, batch {b} (GiB)" for b in batches)
             + f" | max batch in {gpu_memory_gb:g} GiB |", "|---|---|---|---|" + "---|" * (len(batches) + 1)]
    keyed: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        keyed.setdefault((r["artifact"], r["context"], r["kv_dtype"]), {})[r["batch"]] = r
    for (artifact, context, kv_dtype), by_batch in keyed.items():
        first = next(iter(by_batch.values()))
        cells = [f"{r['total_bytes'] / GIB:.2f}" + ("" if r["fits"] else " (over)") if r else "–"
                 for r in (by_batch.get(b) for b in batches)]
        lines.append(f"| {artifact} | {context} | {kv_dtype} | {first['weights_bytes'] / GIB:.3f} | " + " | ".join(cells)
                     + f" | {first['max_batch']} |")
    return lines


def checkpoint_tensor_bytes(model_dir: Path) -> int:
    """The bytes of a safetensors checkpoint's tensors (from the file headers, no data read): what
    loading it as stored puts in memory. A tied head is stored, and counted, once."""
    index = model_dir / "model.safetensors.index.json"
    files = (sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file()
             else sorted(model_dir.glob("*.safetensors")))
    return sum(safetensors_bytes(f) for f in files)


def safetensors_bytes(path: Path) -> int:
    """The bytes of one safetensors file's tensors, from its header."""
    return read_header(path).tensor_bytes
