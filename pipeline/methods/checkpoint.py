"""A whole checkpoint quantized with one registry method: the layer engine, the method's
per-layer quantizer (and transform), and its format's packing and config files.

The output is an HF directory vLLM and transformers read: packed safetensors, embeddings and
head untouched (norms carry AWQ's folded scales), tokenizer, `config.json` with the format's
`quantization_config`. No timings in it: the same work gives the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from qlora_pipeline.compute import DTYPES
from qlora_pipeline.dtypes import quantize_dtype_name
from qlora_pipeline.errors import StageError
from qlora_pipeline.layerwise.checkpoints import copy_tokenizer, read_config, read_tensors, weight_map
from qlora_pipeline.layerwise.engine import quantize_sequentially
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.layerwise.shards import REST_SHARD, SHARD, assemble_shards, save_atomic, valid_shard
from qlora_pipeline.methods import METHODS, dynamic

LAYER_METRICS_LOG = "layer_metrics.jsonl"  # in the checkpoint directory, a line per finished layer


class Quantized(NamedTuple):
    n_layers: int
    size_bytes: int
    checkpoint_format: str
    layer_metrics: list[dict]


def quantize_checkpoint(merged_dir: Path, calibration_ids: Optional[torch.Tensor], entry, dtype: torch.dtype,
                        checkpoint_dir: Path, output_dir: Path, progress: Callable,
                        on_layer: Callable[[int, dict[str, float]], None], search_dir: Optional[Path] = None,
                        device: str = "cpu") -> Quantized:
    """Quantize `merged_dir` with `entry` (a recipe quantize entry) into `output_dir`, resuming
    from the per-layer shards in `checkpoint_dir`; `search_dir`: the finished search of a
    method that has one (else it searches as it goes). `device`: "cpu" or "cuda", resolved
    (the entry's `device` may say auto); the entry's `activations` say where and in what the
    calibration activations are kept."""
    n_layers = quantize_layers(merged_dir, calibration_ids, entry, dtype, checkpoint_dir, progress, on_layer,
                               search_dir, device)
    return assemble_checkpoint(merged_dir, entry, dtype, checkpoint_dir, output_dir, n_layers)


def quantize_layers(merged_dir: Path, calibration_ids: Optional[torch.Tensor], entry, dtype: torch.dtype,
                    checkpoint_dir: Path, progress: Callable, on_layer: Callable[[int, dict[str, float]], None],
                    search_dir: Optional[Path] = None, device: str = "cpu") -> int:
    """The layer-by-layer part of `quantize_checkpoint`: every decoder layer quantized into its
    shard in `checkpoint_dir` (and, for a method that searches as it goes, its search result
    there too); returns the number of layers."""
    method = METHODS[entry.method]
    impl, fmt = method.module(), method.format_module()
    config = read_config(merged_dir)
    family = family_for(config["model_type"])
    transform = impl.transform(entry, family, checkpoint_dir, dtype, search_dir)
    # Each linear with its own settings: the entry's, or a `dynamic` key's overrides for it.
    entries, quantizers = {}, {}

    def entry_for(name: str):
        if name not in entries:
            entries[name] = dynamic.module_entry(entry, name)
        return entries[name]

    def quantize(name: str, W, H):
        mine = entry_for(name)
        key = (mine.bits, mine.group_size)
        if key not in quantizers:
            quantizers[key] = impl.quantizer(mine, dtype)
        return fmt.pack(quantizers[key](name, W, H), mine, H)

    def log_layer(i: int, metrics: dict[str, float]) -> None:
        on_layer(i, metrics)
        with open(checkpoint_dir / LAYER_METRICS_LOG, "a") as f:
            f.write(json.dumps({"layer": i, **metrics}) + "\n")

    n_layers = quantize_sequentially(
        merged_dir, calibration_ids if method.calibrated else None, family, dtype, checkpoint_dir,
        quantize, lambda name, stored: fmt.restore(stored, entry_for(name).bits),
        entry.true_sequential and method.hessian_passes, progress, log_layer, transform_layer=transform,
        compute_dtype=DTYPES[quantize_dtype_name(entry.compute_dtype)], device=device,
        storage=entry.activations.storage, storage_dtype=DTYPES[entry.activations.dtype],
        awq_search_windows=entry.awq.search_windows if "awq" in method.options and search_dir is None else None,
        # the methods that collect a Hessian per sequential group solve with it (GPTQ); AWQ alone
        # collects them in one pass for its metrics and rounds to nearest
        solve=method.hessian_passes)
    return n_layers


def checkpoint_from_layers(layers_dir: Path, merged_dir: Path, entry, dtype: torch.dtype, checkpoint_dir: Path,
                           output_dir: Path, on_layer: Callable[[int, dict[str, float]], None]) -> Quantized:
    """The checkpoint `quantize_checkpoint` would write, from layers another stage has already
    quantized the same way: `layers_dir` holds every layer's shard and the metrics log (an
    awq-search stage quantizes as `awq` does, `publish_layers`). They are linked into
    `checkpoint_dir` and assembled; nothing is computed again."""
    n_layers = int(read_config(merged_dir)["num_hidden_layers"])
    missing = [SHARD.format(i) for i in range(n_layers)  # a published output: its manifest covers it
               if not valid_shard(layers_dir / SHARD.format(i), sealed=False)]
    if missing:
        raise StageError(f"{layers_dir}: {len(missing)} of {n_layers} quantized layers missing or damaged "
                         f"({missing[0]}, ...); rerun the stage that wrote them with --force")
    for name in _layer_files(n_layers):
        target = checkpoint_dir / name
        if target.exists():
            target.unlink()
        link_or_copy(layers_dir / name, target)
    for row in _read_layer_metrics(checkpoint_dir / LAYER_METRICS_LOG):
        on_layer(row["layer"], {k: v for k, v in row.items() if k != "layer"})
    return assemble_checkpoint(merged_dir, entry, dtype, checkpoint_dir, output_dir, n_layers)


def publish_layers(checkpoint_dir: Path, n_layers: int, layers_dir: Path) -> None:
    """Put the finished layer shards and metrics log of `checkpoint_dir` in `layers_dir` (a stage
    output), for `checkpoint_from_layers`: hard links where they can be."""
    layers_dir.mkdir(parents=True, exist_ok=True)
    for name in _layer_files(n_layers):
        link_or_copy(checkpoint_dir / name, layers_dir / name)


def _layer_files(n_layers: int) -> list[str]:
    """What a finished layer-by-layer quantization leaves: a shard per layer and the metrics log."""
    return [SHARD.format(i) for i in range(n_layers)] + [LAYER_METRICS_LOG]


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes written), a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def assemble_checkpoint(merged_dir: Path, entry, dtype: torch.dtype, checkpoint_dir: Path, output_dir: Path,
                        n_layers: int) -> Quantized:
    """The packed HF directory in `output_dir` from the finished layer shards in `checkpoint_dir`."""
    method = METHODS[entry.method]
    fmt = method.format_module()
    config = read_config(merged_dir)
    family = family_for(config["model_type"])
    wmap = weight_map(merged_dir)
    rest_shard = checkpoint_dir / REST_SHARD
    if not (rest_shard.exists() and valid_shard(rest_shard)):
        rest = [n for n in wmap if not family.in_layers(n)]
        save_atomic({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in read_tensors(wmap, rest).items()},
                    rest_shard)

    shard_transform, convention = fmt.output_convention(checkpoint_dir, n_layers, entry)
    layer_metrics = _read_layer_metrics(checkpoint_dir / LAYER_METRICS_LOG)
    total = assemble_shards(checkpoint_dir, output_dir, n_layers, transform=shard_transform)

    meta = {"quantizer": f"qlora-pipeline:{entry.method}", "mse": entry.mse}
    meta.update({section: getattr(entry, section).model_dump(mode="json") for section in method.options})
    qconfig = fmt.quantization_config(entry, meta, convention)
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["quantization_config"] = qconfig
    (output_dir / "config.json").write_text(json.dumps(out_config, indent=2))
    if fmt.CONFIG_FILE:
        (output_dir / fmt.CONFIG_FILE).write_text(json.dumps(fmt.side_file(entry, qconfig), indent=2))
    copy_tokenizer(merged_dir, output_dir)
    return Quantized(n_layers, total, convention["checkpoint_format"], layer_metrics)


def _read_layer_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    by_layer = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_layer[row["layer"]] = row
    return [by_layer[i] for i in sorted(by_layer)]
