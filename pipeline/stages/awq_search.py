"""Stages `awq-search-w<bits>g<group>[-general]`: AWQ's per-layer scale and clip search, done
once for every quantize entry that applies it with the same settings and calibration source
(`awq` and `awq+gptq`).

The search runs as AWQ alone quantizes: layer by layer, each layer's inputs produced by the
layers before it with their scales folded, their weights clipped and rounded to nearest (AWQ's
own 4-bit grid). That is the design measured best on `domain_valid` for both methods (README,
"Where AWQ searches"): for `awq` it is the search its own stage made before (the same bytes),
for `awq+gptq` it was better than a search on the float model, and a recipe with both entries
now searches once. Output, per decoder layer, `awq-XXXXX.safetensors` (the scales of each
scaling group and the clip values of each clipped linear; the search's losses in the
metadata), `search.json` (the settings) and, where an `awq` entry applies it, `awq-layers/`.
"""
from __future__ import annotations

import json

from safetensors.torch import load_file

from qlora_pipeline.compute import DTYPES
from qlora_pipeline.devices import require_cuda
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.layerwise.awq_search import SEARCH_FILE
from qlora_pipeline.layerwise.shards import SHARD, valid_shard
from qlora_pipeline.methods import calibration_stage_name
from qlora_pipeline.methods.checkpoint import link_or_copy, publish_layers, quantize_layers
from qlora_pipeline.models import quantize_source
from qlora_pipeline.recipe import QuantizeEntry
from qlora_pipeline.stages.calibrate import CALIBRATION_FILE

SETTINGS_FILE = "search.json"
# With `publish_layers` (set where an `awq` entry applies the search): the layers as the search
# quantized them (AWQ alone's: its scales, clipping and round-to-nearest), with their metrics
# log; the `awq` entry assembles its checkpoint from them instead of quantizing again.
LAYERS_DIR = "awq-layers"
AWQ_OPTIONS = ("duo_scaling", "clip", "search_windows")


def search_entry(ctx: StageContext) -> QuantizeEntry:
    """The `awq` entry whose quantization makes this search: the search settings, and what the
    entries it serves compute with."""
    s = ctx.config["search"]
    return QuantizeEntry(
        name=ctx.name, method="awq", bits=s["bits"], group_size=s["group_size"],
        awq={k: s[k] for k in AWQ_OPTIONS}, calibration_source=s["calibration_source"],
        compute_dtype=ctx.config["compute_dtype"],
        # Where the activations live is a runtime setting (the same bytes either way), not
        # fingerprinted: the storage the entries served agree on, else auto.
        activations={"dtype": ctx.config["activations_dtype"],
                     "storage": ctx.runtime.get("activations_storage", "auto")})


def _redo_layers_without_their_search(checkpoint_dir) -> None:
    """A resumed search restores each finished layer from its shard without searching it again,
    so a layer whose search file is missing or fails its seal (`valid_shard`) is done again:
    its shard goes. (Otherwise the damaged file would be published as the layer's search.)"""
    for shard in sorted(checkpoint_dir.glob(SHARD.replace("{:05d}", "*"))):
        search = checkpoint_dir / SEARCH_FILE.format(int(shard.name.split("-")[1].split(".")[0]))
        if not (search.exists() and valid_shard(search)):
            shard.unlink()
            search.unlink(missing_ok=True)


def run(ctx: StageContext) -> StageResult:
    s = ctx.config["search"]
    merged_dir = quantize_source(ctx.config, ctx.inputs, ctx.runtime)  # the merge, or the original base (`...-base`)
    calibration = load_file(str(ctx.inputs[calibration_stage_name(s["calibration_source"])] / CALIBRATION_FILE))["input_ids"]
    device = ctx.config["device"]  # resolved from the entries' device by the stage registry
    if device == "cuda":
        require_cuda(f"stage {ctx.name}", "the device of the awq entries it serves")
    # The layers' packed shards are a by-product (and the resume point): the search files are the output.
    _redo_layers_without_their_search(ctx.checkpoint_dir)
    n_layers = quantize_layers(merged_dir, calibration, search_entry(ctx), DTYPES[ctx.config["dtype"]],
                               ctx.checkpoint_dir, ctx.progress,
                               lambda i, metrics: ctx.metrics.log_metrics(metrics, step=i), device=device)
    for i in range(n_layers):  # the finished layers as they are
        link_or_copy(ctx.checkpoint_dir / SEARCH_FILE.format(i), ctx.output_dir / SEARCH_FILE.format(i))
    if ctx.config.get("publish_layers"):  # an `awq` entry applies this search: its layers are these
        publish_layers(ctx.checkpoint_dir, n_layers, ctx.output_dir / LAYERS_DIR)
    (ctx.output_dir / SETTINGS_FILE).write_text(json.dumps(s, indent=2, sort_keys=True))
    return StageResult(metrics={"layers": float(n_layers)})
