"""Stages `quantize-<name>`: requantize the merged model into a standard packed checkpoint.

The method (`rtn`, `gptq`, `awq`, `awq+gptq`, ...) comes from the registry in
`qlora_pipeline.methods`; `methods.checkpoint` runs it layer by layer through the sequential
layer engine and writes the packed HF directory. This stage adds the run's side: the
calibration windows, per-layer errors to MLflow, the stage metrics. `quantize-<name>+adapter`
runs the same on the original base model (`adapter_on_quantized_base`).
"""
from __future__ import annotations

import json

from safetensors.torch import load_file

from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.compute import DTYPES
from qlora_pipeline.devices import require_cuda
from qlora_pipeline.layerwise.checkpoints import read_config
from qlora_pipeline.methods import METHODS, calibration_stage_name, check_shapes
from qlora_pipeline.methods.checkpoint import checkpoint_from_layers, quantize_checkpoint
from qlora_pipeline.models import quantize_source
from qlora_pipeline.recipe import QuantizeEntry
from qlora_pipeline.stages.awq_search import LAYERS_DIR
from qlora_pipeline.stages.calibrate import CALIBRATION_FILE

LAYER_METRICS_FILE = "layer_metrics.json"  # per-layer quantization errors (the report plots them)
SUMMARY_FILE = "quantization.json"         # method and checkpoint format (the evaluation loads by it)


def run(ctx: StageContext) -> StageResult:
    # where the activations live is a runtime setting (the same bytes either way), not fingerprinted
    storage = ctx.runtime.get("activations_storage", "auto")
    entry = QuantizeEntry.model_validate(ctx.config["entry"])
    entry = entry.model_copy(update={"activations": entry.activations.model_copy(update={"storage": storage})})
    merged_dir = quantize_source(ctx.config, ctx.inputs, ctx.runtime)
    check_shapes(entry, read_config(merged_dir), f"quantize entry '{entry.name}'")
    calibration = None
    if METHODS[entry.method].calibrated:  # the entry's source is resolved in its stage settings
        calibration = load_file(str(ctx.inputs[calibration_stage_name(entry.calibration_source)]
                                    / CALIBRATION_FILE))["input_ids"]

    def on_layer(i: int, metrics: dict[str, float]) -> None:
        ctx.metrics.log_metrics(metrics, step=i)

    search = METHODS[entry.method].search  # the one search stage among the inputs (`methods.search_stage_names`)
    search_dir = next((path for stage, path in ctx.inputs.items() if search and stage.startswith(f"{search}-search-")),
                      None)
    device = ctx.config["device"]  # resolved by the stage registry, part of the fingerprint
    if device == "cuda":
        require_cuda(f"quantize entry '{entry.name}'", "its device")
    assembles = search_dir is not None and METHODS[entry.method].assembles_search_layers
    layers = search_dir / LAYERS_DIR if assembles else None
    if layers is not None and layers.is_dir():  # the search quantized as this entry does: assemble its layers
        done = checkpoint_from_layers(layers, merged_dir, entry, DTYPES[ctx.config["dtype"]], ctx.checkpoint_dir,
                                      ctx.output_dir, on_layer)
    else:
        done = quantize_checkpoint(merged_dir, calibration, entry, DTYPES[ctx.config["dtype"]], ctx.checkpoint_dir,
                                   ctx.output_dir, ctx.progress, on_layer, search_dir, device=device)
    (ctx.output_dir / LAYER_METRICS_FILE).write_text(json.dumps(done.layer_metrics))
    # No timings in the output (the same work gives the same bytes): the stage's seconds are
    # in its manifest, where evaluation reads them.
    (ctx.output_dir / SUMMARY_FILE).write_text(json.dumps({"method": entry.method,
                                                           "checkpoint_format": done.checkpoint_format}))
    losses = [v for m in done.layer_metrics for k, v in m.items() if k.count(".") == 1 and k.endswith(".loss")]
    out_errs = [v for m in done.layer_metrics for k, v in m.items() if k.endswith(".output_rel_err")]
    return StageResult(
        metrics={"size_bytes": float(done.size_bytes), "layers": float(done.n_layers), "total_loss": float(sum(losses)),
                 **({"mean_output_rel_err": sum(out_errs) / len(out_errs)} if out_errs else {})},
        info={"checkpoint_format": done.checkpoint_format, "method": entry.method},
    )
