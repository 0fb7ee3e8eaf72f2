"""Stage `base`: the base model's decoder linears in NF4 with double quantization.

Streams the source checkpoint one decoder layer at a time (peak memory about one layer),
quantizes each linear with our `qlora_quant.nf4`, and writes the layer as a checkpoint shard; a
killed run resumes at the first layer without a shard. The output is a sharded safetensors
checkpoint in bitsandbytes' serialization with a `quantization_config` transformers reads.
"""
from __future__ import annotations

import json
import re

import torch

from qlora_pipeline.compute import DTYPES
from qlora_pipeline.layerwise.checkpoints import bnb_quantization_config, is_bnb_4bit, copy_tokenizer, read_config, read_tensors, weight_map
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.models import resolve_model, stage_model
from qlora_pipeline.recipe import NF4Config
from qlora_pipeline.layerwise.shards import REST_SHARD, SHARD, release_freed_memory, save_atomic, valid_shard, assemble_shards
from qlora_pipeline.errors import InputError
from qlora_quant.nf4 import QUANT_STATE_KEY, quantize_nf4, serialize_nf4

def quantize_layer(tensors: dict[str, torch.Tensor], linear_weights: set[str], dtype: torch.dtype, blocksize: int) -> dict[str, torch.Tensor]:
    """NF4 for the named linear weights, `dtype` for every other floating tensor."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in linear_weights:
            out.update(serialize_nf4(quantize_nf4(t.to(dtype), blocksize), name))
        else:
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def run(ctx: StageContext) -> StageResult:
    model_cfg = stage_model(ctx.config, ctx.runtime)
    nf4_cfg = NF4Config.model_validate(ctx.config["nf4"])
    src = resolve_model(model_cfg)
    config = read_config(src, key="model.source")
    family = family_for(config.get("model_type", "?"))
    dtype = DTYPES[model_cfg.dtype]
    n_layers = int(config["num_hidden_layers"])
    wmap = weight_map(src)
    prequantized = is_bnb_4bit(config)

    layer_re = re.compile(re.escape(family.layers_prefix) + r"\.(\d+)\.")
    by_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in wmap:
        m = layer_re.match(name)
        (by_layer.setdefault(int(m.group(1)), []) if m else rest).append(name)

    for i in ctx.progress(range(n_layers), desc="NF4 base", unit="layer"):
        shard = ctx.checkpoint_dir / SHARD.format(i)
        if shard.exists() and valid_shard(shard):
            continue
        linear_weights = {family.layer_prefix(i) + f"{lin}.weight" for lin in family.linears}
        names = by_layer.get(i, [])
        absent = linear_weights - set(names)
        if absent:
            raise ValueError(f"layer {i}: expected linears missing from the checkpoint: {sorted(absent)[:3]}")
        tensors = read_tensors(wmap, names)
        if prequantized:
            # Already NF4 in bitsandbytes' serialization: kept byte for byte, never requantized.
            not_nf4 = [w for w in linear_weights if f"{w}.{QUANT_STATE_KEY}" not in tensors or f"{w}.nested_absmax" not in tensors]
            if not_nf4:
                raise InputError(f"model.source: {not_nf4[0]} is not NF4 with double quantization; "
                                 "give the float checkpoint instead and let the base stage quantize it")
            save_atomic(tensors, shard)
        else:
            save_atomic(quantize_layer(tensors, linear_weights, dtype, nf4_cfg.blocksize), shard)
        release_freed_memory()
        del tensors
    rest_shard = ctx.checkpoint_dir / REST_SHARD
    if not (rest_shard.exists() and valid_shard(rest_shard)):
        rest_tensors = read_tensors(wmap, rest)
        save_atomic(rest_tensors if prequantized else quantize_layer(rest_tensors, set(), dtype, nf4_cfg.blocksize), rest_shard)

    total_size = assemble_shards(ctx.checkpoint_dir, ctx.output_dir, n_layers)
    out_config = dict(config)
    if not prequantized:
        out_config["quantization_config"] = bnb_quantization_config(nf4_cfg)
    out_config["dtype"] = model_cfg.dtype
    out_config.pop("torch_dtype", None)
    (ctx.output_dir / "config.json").write_text(json.dumps(out_config, indent=2))
    copy_tokenizer(src, ctx.output_dir)
    return StageResult(
        metrics={"nf4_linears": float(n_layers * len(family.linears)), "size_bytes": float(total_size)},
        info={"source": str(src), "family": family.name, "prequantized": prequantized},
    )
