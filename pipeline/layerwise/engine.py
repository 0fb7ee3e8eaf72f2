"""The sequential layer engine shared by the quantizers.

Captures the inputs of the first decoder layer for the calibration windows, then for each
decoder layer: loads its weights from the merged checkpoint, collects the Hessian of each
group of linears that share an input (one pass per true-sequential group), quantizes them,
writes the layer's packed result as an intra-stage checkpoint, computes the next layer's
inputs with the quantized weights (so errors propagate as they will at inference), and frees
the layer. Peak memory: one decoder layer plus the calibration activations. A killed stage
resumes at the first layer without a checkpoint, replaying the finished layers' forward
from their packed weights, so the result equals an uninterrupted run's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from qlora_pipeline.compute import compute_context
from qlora_pipeline.layerwise.checkpoints import read_config, read_prefix, weight_map
from qlora_pipeline.layerwise.families import Family
from qlora_pipeline.layerwise.replay import LayerReplays, installer
from qlora_pipeline.layerwise.runner import LayerwiseRunner
from qlora_pipeline.layerwise.shards import SHARD, release_freed_memory, save_atomic, valid_shard
from qlora_quant.gptq import accumulate_hessian


class LinearResult(NamedTuple):
    """What a method returns for one linear: the weight to compute with from now on (exactly
    what the packed tensors decode to), the tensors to store, and metrics."""

    weight: torch.Tensor
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float]


# (full module name, float32 weight [out, in], Hessian or None) -> LinearResult
QuantizeLinear = Callable[[str, torch.Tensor, Optional[torch.Tensor]], LinearResult]
# (full module name, stored tensors of that module) -> float32 weight [out, in]
RestoreLinear = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]
# (layer index, layer, its calibration inputs, position ids, position embeddings) -> metrics.
# Runs before the layer's linears are quantized and may change any of its weights in a way
# that keeps its float function (AWQ folds scales into the norms); the changed non-linear
# tensors are what the layer's checkpoint stores.
TransformLayer = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, tuple], dict[str, float]]


def error_metrics(W: torch.Tensor, Q: torch.Tensor, H: Optional[torch.Tensor]) -> dict[str, float]:
    """Method-independent quantization error of one linear: relative weight error, and with a
    Hessian the relative output error on the calibration inputs, tr(D H D^T) / tr(W H W^T)."""
    D = W - Q
    out = {"weight_rel_err": float((D * D).sum() / (W * W).sum().clamp(min=1e-30))}
    if H is not None:
        out["output_rel_err"] = float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp(min=1e-30))
    return out


def _forward(layer: nn.Module, hidden: torch.Tensor, pos_ids, pos_emb, chunk: int,
             compute_dtype: torch.dtype = torch.float32, replays: Optional[LayerReplays] = None) -> torch.Tensor:
    out = torch.empty_like(hidden)
    with compute_context(compute_dtype):
        for k, s in enumerate(range(0, hidden.shape[0], chunk)):
            with installer(replays)(k):
                out[s : s + chunk] = layer(hidden[s : s + chunk], attention_mask=None, position_ids=pos_ids,
                                           position_embeddings=pos_emb)
    return out


class _InputsSeen(Exception):
    """Raised by a capture hook to stop a layer's forward once the last wanted input is seen."""


def _hessians(layer: nn.Module, groups: list[tuple[str, ...]], hidden, pos_ids, pos_emb, chunk: int,
              compute_dtype: torch.dtype = torch.float32, replays: Optional[LayerReplays] = None) -> list[torch.Tensor]:
    """The Hessian of the input of each group's first linear, from forwards of the layer that
    stop as soon as the last of these inputs has been seen (the rest of the layer is not needed).
    The forwards run in `compute_dtype`; the Hessians accumulate in float32. With `replays`,
    finished modules are replayed and the inputs it asks for are kept."""
    state: list[tuple[Optional[torch.Tensor], int]] = [(None, 0) for _ in groups]
    seen: set[int] = set()
    keep = replays.capture_for([g[0] for g in groups]) if replays is not None else set()
    handles = []
    for k, group in enumerate(groups):
        def hook(mod, inp, k=k, first=group[0]):
            with compute_context(torch.float32):
                state[k] = accumulate_hessian(state[k][0], state[k][1], inp[0].detach())
            if first in keep:
                replays.keep(first, inp[0])
            seen.add(k)
            if len(seen) == len(groups):
                raise _InputsSeen
        handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        for c, s in enumerate(range(0, hidden.shape[0], chunk)):
            seen.clear()
            try:
                with compute_context(compute_dtype), installer(replays)(c):
                    layer(hidden[s : s + chunk], attention_mask=None, position_ids=pos_ids, position_embeddings=pos_emb)
            except _InputsSeen:
                pass
    finally:
        for h in handles:
            h.remove()
    return [h for h, _ in state]


@torch.no_grad()
def quantize_sequentially(merged_dir: Path, calibration_ids: Optional[torch.Tensor], family: Family, dtype: torch.dtype,
                          checkpoint_dir: Path, quantize_linear: QuantizeLinear, restore_linear: RestoreLinear,
                          true_sequential: bool, progress, on_layer: Callable[[int, dict[str, float]], None],
                          transform_layer: Optional[TransformLayer] = None, chunk: int = 8,
                          compute_dtype: torch.dtype = torch.float32) -> int:
    """Quantize every decoder layer of `merged_dir` into `checkpoint_dir/layer-XXXXX.safetensors`.

    `calibration_ids` None means the method needs no activations (round-to-nearest).
    `true_sequential` False collects every group's Hessian in one pass. `compute_dtype`: the
    dtype of the calibration forwards (autocast; weights, Hessians and the solve stay float32;
    an AWQ transform runs its own search in float32).

    Returns:
        The number of decoder layers.
    """
    wmap = weight_map(merged_dir)
    runner = LayerwiseRunner(read_config(merged_dir), torch.float32, family)
    n_layers = len(runner.layers)
    hidden = pos_ids = pos_emb = None
    if calibration_ids is not None:
        hidden, pos_ids, pos_emb = _first_inputs(runner, wmap, family, calibration_ids)

    groups = list(family.sequential_groups)
    for i in progress(range(n_layers), desc="quantize", unit="layer"):
        prefix = family.layer_prefix(i)
        layer = runner.layers[i]
        tensor_names = [n[len(prefix):] for n in wmap if n.startswith(prefix)]
        runner.materialize(layer, read_prefix(wmap, prefix), torch.float32)
        shard = checkpoint_dir / SHARD.format(i)
        replays: Optional[LayerReplays] = None  # set when this layer is quantized true-sequentially
        linear_names = {prefix + lin for lin in family.linears}
        if shard.exists() and valid_shard(shard):
            stored = _load(shard)
            for lin in family.linears:
                module = layer.get_submodule(lin)
                mine = {k[len(prefix + lin) + 1:]: v for k, v in stored.items() if k.startswith(prefix + lin + ".")}
                module.weight.data = restore_linear(prefix + lin, mine)
            for name, t in stored.items():  # norms, as a transform left them
                if name.rsplit(".", 1)[0] not in linear_names:
                    layer.get_parameter(name[len(prefix):]).data = t.float()
        else:
            out: dict[str, torch.Tensor] = {}
            metrics: dict[str, float] = {}
            if transform_layer is not None:
                metrics.update(transform_layer(i, layer, hidden, pos_ids, pos_emb))
            passes = [[g] for g in groups] if true_sequential else [groups]
            if hidden is not None and true_sequential:
                replays = LayerReplays(layer, family, -(-hidden.shape[0] // chunk), hidden.shape[0] * hidden.shape[1])
            for batch in passes:
                hessians = (_hessians(layer, batch, hidden, pos_ids, pos_emb, chunk, compute_dtype, replays)
                            if hidden is not None else [None] * len(batch))
                for group, H in zip(batch, hessians):
                    for lin in group:
                        module = layer.get_submodule(lin)
                        W = module.weight.data.float()
                        result = quantize_linear(prefix + lin, W, H)
                        module.weight.data = result.weight.float()
                        out.update({f"{prefix}{lin}.{k}": v for k, v in result.tensors.items()})
                        if replays is not None:
                            replays.quantized.add(lin)
                        short = lin.rsplit('.', 1)[-1]
                        metrics.update({f"{short}.{k}": v for k, v in result.metrics.items()})
                        metrics.update({f"{short}.{k}": v for k, v in error_metrics(W, module.weight.data, H).items()})
            for name in tensor_names:
                if f"{prefix}{name}".rsplit(".", 1)[0] not in linear_names:
                    t = layer.get_parameter(name)  # as the transform (if any) left it
                    out[prefix + name] = t.data.to(dtype) if t.is_floating_point() else t.data
            on_layer(i, metrics)  # before the shard: a layer redone after a kill just logs again
            save_atomic(out, shard)
        if hidden is not None:
            hidden = _forward(layer, hidden, pos_ids, pos_emb, chunk, compute_dtype, replays)
        replays = None  # its kept inputs are this layer's
        layer.to("meta")
        release_freed_memory()
    return n_layers



@torch.no_grad()
def transform_sequentially(merged_dir: Path, calibration_ids: torch.Tensor, family: Family,
                           transform_layer: TransformLayer, progress, on_layer: Callable[[int, dict[str, float]], None],
                           chunk: int = 8, compute_dtype: torch.dtype = torch.float32) -> int:
    """Run `transform_layer` on every decoder layer in turn, each layer's inputs computed by the
    transformed float layers before it (nothing is quantized, nothing stored here: the
    transform keeps its own per-layer results, e.g. AWQ's search, and resumes from them).

    Returns:
        The number of decoder layers.
    """
    wmap = weight_map(merged_dir)
    runner = LayerwiseRunner(read_config(merged_dir), torch.float32, family)
    hidden, pos_ids, pos_emb = _first_inputs(runner, wmap, family, calibration_ids)
    for i in progress(range(len(runner.layers)), desc="search", unit="layer"):
        layer = runner.layers[i]
        runner.materialize(layer, read_prefix(wmap, family.layer_prefix(i)), torch.float32)
        on_layer(i, transform_layer(i, layer, hidden, pos_ids, pos_emb))
        hidden = _forward(layer, hidden, pos_ids, pos_emb, chunk, compute_dtype)
        layer.to("meta")
        release_freed_memory()
    return len(runner.layers)


def _first_inputs(runner: LayerwiseRunner, wmap: dict[str, Path], family: Family, calibration_ids: torch.Tensor):
    """(hidden states, position ids, position embeddings) entering the first decoder layer."""
    embed = runner.base.embed_tokens
    runner.materialize(embed, read_prefix(wmap, family.embed + "."), torch.float32)
    hidden = embed(calibration_ids)
    pos_ids = torch.arange(calibration_ids.shape[1]).unsqueeze(0)
    pos_emb = runner.base.rotary_emb(hidden, position_ids=pos_ids)
    embed.to("meta")
    return hidden, pos_ids, pos_emb


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
