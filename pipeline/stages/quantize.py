"""Stages `quantize-<name>`: requantize the merged model (GPTQ, or round-to-nearest in the same
format as the baseline) into a standard packed GPTQ checkpoint.

Layer by layer through the sequential layer engine; per-layer quantization error goes to
MLflow. The output is an HF directory vLLM and transformers read: packed safetensors,
untouched embeddings/norms/head, tokenizer, `config.json` with the `quantization_config` of
the GPTQ format (and `quantize_config.json`). Zero points are kept true (v2) in the
checkpoints; at the end the checkpoint is written in the common v1 format (zero - 1) unless
some zero is 0, which v1 cannot store (then `checkpoint_format: gptq_v2`).
"""
from __future__ import annotations

import json
import math
import time
from functools import partial

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoints import DTYPES, copy_tokenizer, read_config, read_tensors, weight_map
from pipeline.errors import InputError
from pipeline.families import family_for
from pipeline.graph import StageContext, StageResult
from pipeline.layer_engine import LinearResult, quantize_sequentially
from pipeline.shards import REST_SHARD, SHARD, save_atomic, valid_shard, assemble_shards
from quant.gptq import GPTQResult, gptq_quantize, rtn_quantize
from quant.packing import GPTQPacked, dequantize_gptq, pack_gptq, unpack_along_rows, unpack_gptq

VERSION = 1


def values_per_word_run(bits: int) -> int:
    """Rows that fill whole int32 words: 8 for 4-bit, 16 for 2-bit, 4 for 8-bit, 32 for 3-bit."""
    return 32 // math.gcd(bits, 32)


def divisors_hint(n: int, bits: int) -> list[int]:
    pf = values_per_word_run(bits)
    return [d for d in range(8, n + 1) if n % d == 0 and d % pf == 0]


def check_shapes(entry, config: dict, key: str) -> None:
    """A group size that does not divide a layer's input size is a recipe error."""
    sizes = {"hidden_size": int(config["hidden_size"]), "intermediate_size": int(config["intermediate_size"])}
    pf = values_per_word_run(entry.bits)
    for what, n in sizes.items():
        if entry.group_size != -1 and n % entry.group_size:
            common = [d for d in divisors_hint(sizes["hidden_size"], entry.bits) if sizes["intermediate_size"] % d == 0]
            raise InputError(f"{key}.group_size: {entry.group_size} does not divide the model's {what} {n}; "
                             f"group sizes that work: {', '.join(map(str, common[:12]))} or -1")
        if n % pf:
            raise InputError(f"{key}.bits: {entry.bits}-bit packing needs sizes divisible by {pf}; {what} is {n}")


def _linear_result(res: GPTQResult, bits: int, H) -> LinearResult:
    packed = pack_gptq(res.codes, res.zeros, res.scales, res.g_idx, bits, v1=False)
    metrics = {"loss": res.loss}
    if H is not None:
        metrics["damp_percent"] = res.damp_percent
    return LinearResult(res.Q, packed._asdict(), metrics)


def _restore(name: str, stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The weight a finished layer computes with, from its checkpoint shard (true zeros)."""
    packed = GPTQPacked(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"])
    return dequantize_gptq(packed, bits, v1=False)


def run(ctx: StageContext) -> StageResult:
    started = time.time()
    entry = ctx.config["entry"]
    name = entry["name"]
    recipe = ctx.recipe
    q = next(e for e in recipe.quantize if e.name == name)
    key = f"quantize.{recipe.quantize.index(q)}"
    merged_dir = ctx.inputs["merge"]
    config = read_config(merged_dir)
    family = family_for(config["model_type"])
    check_shapes(q, config, key)
    dtype = DTYPES[recipe.model.dtype]

    if q.method == "rtn":  # build_stages registers only implemented methods: rtn, gptq
        calibration = None
        method = lambda n, W, H: _linear_result(
            rtn_quantize(W, q.bits, q.group_size, q.sym, q.mse, scale_dtype=torch.float16), q.bits, None)
    else:
        calibration = load_file(str(ctx.inputs["calibrate"] / "calibration.safetensors"))["input_ids"]
        method = lambda n, W, H: _linear_result(
            gptq_quantize(W, H, q.bits, q.group_size, q.sym, q.desc_act, q.static_groups, q.damp_percent,
                          mse=q.mse, scale_dtype=torch.float16), q.bits, H)

    def on_layer(i: int, metrics: dict[str, float]) -> None:
        ctx.metrics.log_metrics(metrics, step=i)
        with open(ctx.checkpoint_dir / "layer_metrics.jsonl", "a") as f:
            f.write(json.dumps({"layer": i, **metrics}) + "\n")

    n_layers = quantize_sequentially(
        merged_dir, calibration, family, dtype, ctx.checkpoint_dir, method, partial(_restore, bits=q.bits),
        q.true_sequential, ctx.progress, on_layer)

    wmap = weight_map(merged_dir)
    rest_shard = ctx.checkpoint_dir / REST_SHARD
    if not (rest_shard.exists() and valid_shard(rest_shard)):
        rest = [n for n in wmap if not n.startswith(family.layers_prefix + ".")]
        save_atomic({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in read_tensors(wmap, rest).items()},
                     rest_shard)

    v1 = q.sym or not any(_has_zero_zero(ctx.checkpoint_dir / SHARD.format(i), q.bits) for i in range(n_layers))
    layer_metrics = _read_layer_metrics(ctx.checkpoint_dir / "layer_metrics.jsonl")
    total = assemble_shards(ctx.checkpoint_dir, ctx.output_dir, n_layers,
                            transform=partial(_to_v1, bits=q.bits) if v1 else None)

    qconfig = {
        "quant_method": "gptq", "bits": q.bits, "group_size": q.group_size, "desc_act": q.desc_act, "sym": q.sym,
        "static_groups": q.static_groups, "true_sequential": q.true_sequential, "damp_percent": q.damp_percent,
        "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32", "lm_head": False,
        "meta": {"quantizer": f"qlora-pipeline:{q.method}", "mse": q.mse},
    }
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["quantization_config"] = qconfig
    (ctx.output_dir / "config.json").write_text(json.dumps(out_config, indent=2))
    (ctx.output_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    copy_tokenizer(merged_dir, ctx.output_dir)
    (ctx.output_dir / "layer_metrics.json").write_text(json.dumps(layer_metrics))
    losses = [v for m in layer_metrics for k, v in m.items() if k.endswith(".loss")]
    # Wall time of this invocation (a resumed stage counts only its own part; see the manifest).
    (ctx.output_dir / "quantization.json").write_text(json.dumps(
        {"method": q.method, "seconds": round(time.time() - started, 3), "checkpoint_format": qconfig["checkpoint_format"]}))
    return StageResult(
        metrics={"size_bytes": float(total), "layers": float(n_layers), "total_loss": float(sum(losses))},
        info={"checkpoint_format": qconfig["checkpoint_format"], "method": q.method},
    )


def _has_zero_zero(shard, bits: int) -> bool:
    with safe_open(shard, "pt") as st:
        for k in st.keys():
            if k.endswith(".qzeros"):
                if (unpack_along_rows(st.get_tensor(k).t().contiguous(), bits) == 0).any():
                    return True
    return False


def _to_v1(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """qzeros from true zeros (v2) to the v1 convention (zero - 1)."""
    for k in [k for k in tensors if k.endswith(".qzeros")]:
        prefix = k[: -len(".qzeros")]
        packed = GPTQPacked(tensors[f"{prefix}.qweight"], tensors[k], tensors[f"{prefix}.scales"], tensors[f"{prefix}.g_idx"])
        codes, zeros = unpack_gptq(packed, bits, v1=False)
        tensors[k] = pack_gptq(codes, zeros, packed.scales, packed.g_idx, bits, v1=True).qzeros
    return tensors


def _read_layer_metrics(path) -> list[dict]:
    if not path.exists():
        return []
    by_layer = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_layer[row["layer"]] = row
    return [by_layer[i] for i in sorted(by_layer)]
