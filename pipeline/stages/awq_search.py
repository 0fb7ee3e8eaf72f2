"""Stages `awq-search-w<bits>g<group>[-general]`: AWQ's per-layer scale and clip search, done
once for every quantize entry that applies it with the same settings and calibration source
(`awq` and `awq+gptq`).

The search runs on the scaled full-precision model, as AWQ's reference does: each layer's
inputs come from the layers before it with their scales folded and their weights clipped,
not quantized, so the result does not depend on the quantizer that follows it. Output, per
decoder layer, `awq-XXXXX.safetensors` (the scales of each scaling group and the clip values
of each clipped linear; the search's losses in the metadata), and `search.json` (the settings).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file

from qlora_pipeline.compute import DTYPES
from qlora_pipeline.devices import require_cuda
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.layerwise.awq_search import SEARCH_FILE, AWQSettings, make_transform
from qlora_pipeline.layerwise.checkpoints import read_config
from qlora_pipeline.layerwise.engine import transform_sequentially
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.methods import calibration_stage_name
from qlora_pipeline.models import quantize_source
from qlora_pipeline.stages.calibrate import CALIBRATION_FILE

SETTINGS_FILE = "search.json"


def run(ctx: StageContext) -> StageResult:
    s = ctx.config["search"]
    settings = AWQSettings(s["bits"], s["group_size"], s["duo_scaling"], s["clip"], s["search_windows"])
    merged_dir = quantize_source(ctx.config, ctx.inputs)  # the merge, or the original base (`...-base`)
    family = family_for(read_config(merged_dir)["model_type"])
    calibration = load_file(str(ctx.inputs[calibration_stage_name(s["calibration_source"])] / CALIBRATION_FILE))["input_ids"]
    transform = make_transform(family, settings, ctx.checkpoint_dir, DTYPES[ctx.config["dtype"]])
    device = ctx.config["device"]  # resolved from the entries' device by the stage registry
    if device == "cuda":
        require_cuda(f"stage {ctx.name}", "the device of the awq entries it serves")
    # Where the activations live is a runtime setting (the same bytes either way), not fingerprinted:
    # the storage the entries served agree on, else auto.
    n_layers = transform_sequentially(merged_dir, calibration, family, transform, ctx.progress,
                                      lambda i, metrics: ctx.metrics.log_metrics(metrics, step=i),
                                      compute_dtype=torch.float32,  # the search's own forwards are float32
                                      device=device, storage=ctx.runtime.get("activations_storage", "auto"),
                                      storage_dtype=DTYPES[ctx.config["activations_dtype"]],
                                      awq_search_windows=settings.search_windows)
    for i in range(n_layers):
        name = SEARCH_FILE.format(i)
        try:  # the finished layers as they are: a hard link, a copy across file systems
            os.link(ctx.checkpoint_dir / name, ctx.output_dir / name)
        except OSError:
            shutil.copyfile(ctx.checkpoint_dir / name, ctx.output_dir / name)
    (ctx.output_dir / SETTINGS_FILE).write_text(json.dumps(s, indent=2, sort_keys=True))
    return StageResult(metrics={"layers": float(n_layers)})
