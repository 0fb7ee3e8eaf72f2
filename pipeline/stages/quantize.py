"""Stages `quantize-<name>`: requantize the merged model into a standard packed checkpoint.

Methods: `rtn` (round-to-nearest, the baseline), `gptq`, `awq` (scale + clip search, then
round-to-nearest on the scaled weights, AWQ GEMM layout) and `awq+gptq` (AWQ's scales and
clipping, then GPTQ's solve on the scaled weights, GPTQ layout).

Layer by layer through the sequential layer engine; per-layer quantization error goes to
MLflow. The output is an HF directory vLLM and transformers read: packed safetensors,
embeddings/head untouched (norms carry AWQ's folded scales), tokenizer, `config.json` with
the `quantization_config` of the format. GPTQ zero points are kept true (v2) in the
checkpoints; at the end the checkpoint is written in the common v1 format (zero - 1) unless
some zero is 0, which v1 cannot store (then `checkpoint_format: gptq_v2`).
"""
from __future__ import annotations

import json
from functools import partial

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qlora_pipeline.layerwise.checkpoints import DTYPES, copy_tokenizer, read_config, read_tensors, weight_map
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.layerwise.awq_search import AWQSettings, make_transform
from qlora_pipeline.layerwise.engine import LinearResult, quantize_sequentially
from qlora_pipeline.layerwise.shards import REST_SHARD, SHARD, save_atomic, valid_shard, assemble_shards
from qlora_pipeline.stages.quantize_settings import METHODS, check_shapes, relevant_settings  # noqa: F401  (re-exported)
from qlora_quant.gptq import GPTQResult, gptq_quantize, rtn_quantize
from qlora_quant.packing import (
    AWQPacked, GPTQPacked, dequantize_awq, dequantize_gptq, pack_awq, pack_gptq, unpack_along_rows, unpack_gptq,
)


def _linear_result(res: GPTQResult, bits: int, H) -> LinearResult:
    packed = pack_gptq(res.codes, res.zeros, res.scales, res.g_idx, bits, v1=False)
    metrics = {"loss": res.loss}
    if H is not None:
        metrics["damp_percent"] = res.damp_percent
    return LinearResult(res.Q, packed._asdict(), metrics)


def _awq_result(res: GPTQResult) -> LinearResult:
    return LinearResult(res.Q, pack_awq(res.codes, res.zeros, res.scales)._asdict(), {})


def _restore(name: str, stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The weight a finished layer computes with, from its checkpoint shard (true zeros)."""
    if "g_idx" not in stored:
        return dequantize_awq(AWQPacked(stored["qweight"], stored["qzeros"], stored["scales"]))
    packed = GPTQPacked(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"])
    return dequantize_gptq(packed, bits, v1=False)


def quantization_config(q, v1: bool) -> dict:
    """The `quantization_config` vLLM and transformers read for the output's format."""
    meta = {"quantizer": f"qlora-pipeline:{q.method}", "mse": q.mse}
    if q.method.startswith("awq"):
        meta["awq"] = q.awq.model_dump(mode="json")
    if q.method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": q.group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None, "meta": meta}
    return {
        "quant_method": "gptq", "bits": q.bits, "group_size": q.group_size, "desc_act": q.desc_act, "sym": q.sym,
        "static_groups": q.static_groups, "true_sequential": q.true_sequential, "damp_percent": q.damp_percent,
        "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32", "lm_head": False, "meta": meta,
    }


def run(ctx: StageContext) -> StageResult:
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

    calibration = None
    if q.method != "rtn":
        calibration = load_file(str(ctx.inputs["calibrate"] / "calibration.safetensors"))["input_ids"]
    transform = None
    if q.method.startswith("awq"):
        settings = AWQSettings(q.bits, q.group_size, q.awq.duo_scaling, q.awq.clip, q.awq.search_windows)
        transform = make_transform(family, settings, ctx.checkpoint_dir, dtype)
    if q.method == "rtn":
        method = lambda n, W, H: _linear_result(
            rtn_quantize(W, q.bits, q.group_size, q.sym, q.mse, scale_dtype=torch.float16), q.bits, None)
    elif q.method == "awq":  # the clip search has set each group's range: plain min/max from here
        method = lambda n, W, H: _awq_result(rtn_quantize(W, 4, q.group_size, sym=False, scale_dtype=torch.float16))
    else:
        method = lambda n, W, H: _linear_result(
            gptq_quantize(W, H, q.bits, q.group_size, q.sym, q.desc_act, q.static_groups, q.damp_percent,
                          mse=q.mse, scale_dtype=torch.float16), q.bits, H)

    def on_layer(i: int, metrics: dict[str, float]) -> None:
        ctx.metrics.log_metrics(metrics, step=i)
        with open(ctx.checkpoint_dir / "layer_metrics.jsonl", "a") as f:
            f.write(json.dumps({"layer": i, **metrics}) + "\n")

    # AWQ alone needs the Hessians only for the error metrics: one pass per layer is enough.
    true_sequential = q.true_sequential and q.method != "awq"
    n_layers = quantize_sequentially(
        merged_dir, calibration, family, dtype, ctx.checkpoint_dir, method, partial(_restore, bits=q.bits),
        true_sequential, ctx.progress, on_layer, transform_layer=transform)

    wmap = weight_map(merged_dir)
    rest_shard = ctx.checkpoint_dir / REST_SHARD
    if not (rest_shard.exists() and valid_shard(rest_shard)):
        rest = [n for n in wmap if not n.startswith(family.layers_prefix + ".")]
        save_atomic({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in read_tensors(wmap, rest).items()},
                     rest_shard)

    gptq_layout = q.method != "awq"
    v1 = gptq_layout and (q.sym or not any(_has_zero_zero(ctx.checkpoint_dir / SHARD.format(i), q.bits)
                                           for i in range(n_layers)))
    layer_metrics = _read_layer_metrics(ctx.checkpoint_dir / "layer_metrics.jsonl")
    total = assemble_shards(ctx.checkpoint_dir, ctx.output_dir, n_layers,
                            transform=partial(_to_v1, bits=q.bits) if v1 else None)

    qconfig = quantization_config(q, v1)
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["quantization_config"] = qconfig
    (ctx.output_dir / "config.json").write_text(json.dumps(out_config, indent=2))
    if gptq_layout:
        (ctx.output_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    else:  # AutoAWQ's legacy file
        (ctx.output_dir / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": q.group_size, "w_bit": 4, "version": "GEMM"}, indent=2))
    copy_tokenizer(merged_dir, ctx.output_dir)
    (ctx.output_dir / "layer_metrics.json").write_text(json.dumps(layer_metrics))
    losses = [v for m in layer_metrics for k, v in m.items() if k.count(".") == 1 and k.endswith(".loss")]
    out_errs = [v for m in layer_metrics for k, v in m.items() if k.endswith(".output_rel_err")]
    # No timings in the output (the same work gives the same bytes): the stage's seconds are
    # in its manifest, where evaluation reads them.
    fmt = qconfig.get("checkpoint_format", "awq-gemm")
    (ctx.output_dir / "quantization.json").write_text(json.dumps({"method": q.method, "checkpoint_format": fmt}))
    return StageResult(
        metrics={"size_bytes": float(total), "layers": float(n_layers), "total_loss": float(sum(losses)),
                 **({"mean_output_rel_err": sum(out_errs) / len(out_errs)} if out_errs else {})},
        info={"checkpoint_format": fmt, "method": q.method},
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
