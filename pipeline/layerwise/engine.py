"""The sequential layer engine shared by the quantizers.

Captures the inputs of the first decoder layer for the calibration windows, then for each
decoder layer: loads its weights from the merged checkpoint, collects the Hessian of each
group of linears that share an input (one pass per true-sequential group), quantizes them,
writes the layer's packed result as an intra-stage checkpoint, computes the next layer's
inputs with the quantized weights (so errors propagate as they will at inference), and frees
the layer. Peak memory: one decoder layer plus one set of calibration activations (each
chunk's outputs overwrite its inputs). A killed stage resumes at the first layer without a
checkpoint, replaying the finished layers' forward from their packed weights, so the result
equals an uninterrupted run's.

Where it computes: `device` ("cpu" or "cuda") holds the layer, its Hessians and the solve;
the activations live on that device or in pinned host memory streamed to it chunk by chunk
(`Activations`; `placement.plan` decides), stored in float32 or bfloat16 and always computed
in float32. The shards are written from the CPU as before. On the CPU with float32 storage
the arithmetic is the same as before this option existed, so are the bytes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from qlora_pipeline.compute import compute_context
from qlora_pipeline.layerwise.checkpoints import read_config, read_prefix, weight_map
from qlora_pipeline.layerwise.families import Family
from qlora_pipeline.layerwise.replay import LayerReplays, installer
from qlora_pipeline.layerwise.placement import Placement
from qlora_pipeline.layerwise.runner import LayerwiseRunner
from qlora_pipeline.layerwise.shards import SHARD, release_freed_memory, save_atomic, valid_shard
from qlora_quant.gptq import accumulate_hessian

logger = logging.getLogger(__name__)


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


class Activations:
    """The calibration activations entering the current decoder layer: [windows, tokens, hidden],
    stored in `dtype` on the compute device (`placement` "device") or in host memory ("host"),
    pinned when the device is CUDA so that chunks cross with non-blocking copies.

    Chunks are handed to the layer on the device in float32 (`batches`) and their outputs
    written back over them (`write`): windows are independent, so a chunk's inputs are dead once
    its outputs exist, and one set is live instead of two. All copies are issued on the current
    CUDA stream, so each waits for the work before it; `sync` waits for the host writes.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, placement: Placement,
                 chunk: int):
        self.device, self.chunk, self.placement = torch.device(device), chunk, placement
        on_device = placement == "device" or self.device.type == "cpu"
        pin = not on_device and self.device.type == "cuda"  # pinning needs CUDA; page-locked memory is scarce
        self.data = torch.empty(shape, dtype=dtype, device=self.device if on_device else "cpu", pin_memory=pin)
        self._non_blocking = self.device.type == "cuda"
        # Streamed chunks are private copies even when the device is the CPU, so that the copy in,
        # compute, copy back path is the one the CPU tests run (the CUDA copies are the same path).
        self._copy_chunks = placement == "host"

    @property
    def windows(self) -> int:
        return self.data.shape[0]

    def batches(self):
        """(start, float32 chunk on the device) for every chunk of windows, in order. On the CPU
        with float32 storage the chunk is a view of the storage, as the engine always used."""
        for s in range(0, self.windows, self.chunk):
            stored = self.data[s : s + self.chunk]
            # two steps: a bf16 chunk crosses at half the bytes and is widened on the device
            x = stored.to(self.device, non_blocking=self._non_blocking).float()
            yield s, (x.clone() if self._copy_chunks and x.data_ptr() == stored.data_ptr() else x)

    def write(self, start: int, x: torch.Tensor) -> None:
        # non-blocking only from the device (into pinned memory, or device to device): a copy from
        # pageable host memory could read its source after the caller has let go of it
        self.data[start : start + x.shape[0]].copy_(x, non_blocking=self._non_blocking and x.device.type == "cuda")

    def sync(self) -> None:
        if self.device.type == "cuda" and self.data.device.type == "cpu":
            torch.cuda.synchronize(self.device)


def _forward(layer: nn.Module, hidden: Activations, pos_ids, pos_emb,
             compute_dtype: torch.dtype = torch.float32, replays: Optional[LayerReplays] = None) -> None:
    """The layer's outputs for every window, written over its inputs in `hidden` (finished
    modules replayed from their kept inputs when `replays` has them)."""
    with compute_context(compute_dtype, hidden.device.type):
        for c, (s, x) in enumerate(hidden.batches()):
            with installer(replays)(c):
                hidden.write(s, layer(x, attention_mask=None, position_ids=pos_ids, position_embeddings=pos_emb))
    hidden.sync()


class _InputsSeen(Exception):
    """Raised by a capture hook to stop a layer's forward once the last wanted input is seen."""


def _hessians(layer: nn.Module, groups: list[tuple[str, ...]], hidden: Activations, pos_ids, pos_emb,
              compute_dtype: torch.dtype = torch.float32, replays: Optional[LayerReplays] = None) -> list[torch.Tensor]:
    """The Hessian of the input of each group's first linear, from forwards of the layer that
    stop as soon as the last of these inputs has been seen (the rest of the layer is not needed).
    The forwards run in `compute_dtype`; the Hessians accumulate in float32 on the layer's device."""
    state: list[tuple[Optional[torch.Tensor], int]] = [(None, 0) for _ in groups]
    seen: set[int] = set()
    keep = replays.capture_for([g[0] for g in groups]) if replays is not None else set()
    handles = []
    for k, group in enumerate(groups):
        def hook(mod, inp, k=k, first=group[0]):
            with compute_context(torch.float32, hidden.device.type):
                state[k] = accumulate_hessian(state[k][0], state[k][1], inp[0].detach())
            if first in keep:
                replays.keep(first, inp[0])
            seen.add(k)
            if len(seen) == len(groups):
                raise _InputsSeen
        handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        for c, (_, x) in enumerate(hidden.batches()):
            seen.clear()
            try:
                with compute_context(compute_dtype, hidden.device.type), installer(replays)(c):
                    layer(x, attention_mask=None, position_ids=pos_ids, position_embeddings=pos_emb)
            except _InputsSeen:
                pass
    finally:
        for h in handles:
            h.remove()
    return [h for h, _ in state]


def choose_placement(config: dict, shape: tuple[int, int], storage_dtype: torch.dtype, device: torch.device,
                     storage: str, chunk: int, hessians: int, solve: bool, awq_search_windows: Optional[int],
                     where: str) -> Placement:
    """Where the activations of `shape` (windows, tokens) live for this model and method: the
    `activations.storage` setting, with "auto" decided by `placement.plan` from the device's free
    memory. On the CPU the device is host memory: nothing to decide; a forced "host" still
    takes the streaming path (copies in, writes back), which is how the CPU tests check it."""
    device = torch.device(device)
    if device.type != "cuda":
        return "host" if storage == "host" else "device"
    from qlora_pipeline.layerwise.placement import host_available_bytes, plan, workload_for

    work = workload_for(config, shape[0], shape[1], torch.finfo(storage_dtype).bits // 8, chunk, hessians, solve,
                        awq_search_windows)
    free, _ = torch.cuda.mem_get_info(device)
    decided = plan(work, free, host_available_bytes(), storage, where)
    logger.info("%s: activations on the %s (%s)", where, "GPU" if decided.placement == "device" else "host",
                decided.why)
    return decided.placement


@torch.no_grad()
def quantize_sequentially(merged_dir: Path, calibration_ids: Optional[torch.Tensor], family: Family, dtype: torch.dtype,
                          checkpoint_dir: Path, quantize_linear: QuantizeLinear, restore_linear: RestoreLinear,
                          true_sequential: bool, progress, on_layer: Callable[[int, dict[str, float]], None],
                          transform_layer: Optional[TransformLayer] = None, chunk: int = 8,
                          compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
                          storage: str = "auto", storage_dtype: torch.dtype = torch.float32,
                          awq_search_windows: Optional[int] = None, solve: bool = True) -> int:
    """Quantize every decoder layer of `merged_dir` into `checkpoint_dir/layer-XXXXX.safetensors`.

    `calibration_ids` None means the method needs no activations (round-to-nearest).
    `true_sequential` False collects every group's Hessian in one pass. `compute_dtype`: the
    dtype of the calibration forwards (autocast; weights, Hessians and the solve stay float32;
    an AWQ transform runs its own search in float32). `device`: where the layer, its Hessians
    and the solve live; `storage` ("auto", "device", "host") and `storage_dtype`: where and in
    what the activations are kept between layers (`choose_placement`); `awq_search_windows`:
    the transform searches AWQ scales here; `solve`: `quantize_linear` solves with the Hessian
    (GPTQ's copies of it); both only size the plan.

    Returns:
        The number of decoder layers.
    """
    device = torch.device(device)
    wmap = weight_map(merged_dir)
    config = read_config(merged_dir)
    runner = LayerwiseRunner(config, torch.float32, family)
    n_layers = len(runner.layers)
    hidden = pos_ids = pos_emb = None
    if calibration_ids is not None:
        placement = choose_placement(config, tuple(calibration_ids.shape), storage_dtype, device, storage, chunk,
                                     1 if true_sequential else 4, solve, awq_search_windows, "quantize")
        hidden, pos_ids, pos_emb = _first_inputs(runner, wmap, family, calibration_ids, device, placement,
                                                 storage_dtype, chunk)

    groups = list(family.sequential_groups)
    for i in progress(range(n_layers), desc="quantize", unit="layer"):
        prefix = family.layer_prefix(i)
        layer = runner.layers[i]
        tensor_names = [n[len(prefix):] for n in wmap if n.startswith(prefix)]
        runner.materialize(layer, _to(read_prefix(wmap, prefix), device), torch.float32)
        shard = checkpoint_dir / SHARD.format(i)
        replays: Optional[LayerReplays] = None  # set when this layer is quantized true-sequentially
        if shard.exists() and valid_shard(shard):
            _restore_layer(layer, prefix, family, shard, restore_linear, device)
        else:
            metrics: dict[str, float] = {}
            if transform_layer is not None:
                metrics.update(transform_layer(i, layer, hidden, pos_ids, pos_emb))
            passes = [[g] for g in groups] if true_sequential else [groups]
            if hidden is not None and true_sequential:
                replays = LayerReplays(layer, family, -(-hidden.windows // hidden.chunk),
                                       hidden.windows * hidden.data.shape[1])
            out = _quantize_linears(layer, prefix, passes, hidden, pos_ids, pos_emb, compute_dtype, replays,
                                    quantize_linear, metrics)
            linear_names = {prefix + lin for lin in family.linears}
            for name in tensor_names:
                if f"{prefix}{name}".rsplit(".", 1)[0] not in linear_names:
                    t = layer.get_parameter(name)  # as the transform (if any) left it
                    out[prefix + name] = (t.data.to(dtype) if t.is_floating_point() else t.data).cpu()
            on_layer(i, metrics)  # before the shard: a layer redone after a kill just logs again
            save_atomic(out, shard)
            del out  # the packed layer is on disk; the next layer's search should not share the room
        if hidden is not None:
            _forward(layer, hidden, pos_ids, pos_emb, compute_dtype, replays)
        replays = None  # its kept inputs are this layer's
        layer.to("meta")
        _release(device)
    return n_layers


def _quantize_linears(layer: nn.Module, prefix: str, passes: list[list[tuple[str, ...]]],
                      hidden: Optional["Activations"], pos_ids, pos_emb, compute_dtype: torch.dtype,
                      replays: Optional[LayerReplays], quantize_linear: QuantizeLinear,
                      metrics: dict[str, float]) -> dict[str, torch.Tensor]:
    """Quantize the layer's linears pass by pass (each pass: the Hessians of its groups, then
    their linears); returns the tensors to store and adds to `metrics`. Each Hessian is dropped
    as soon as its group is quantized, before the next pass captures its own, and nothing of
    a linear's work (its float32 original, the method's result) outlives its turn, so the
    next pass and the next layer's search find that memory free (on an 8B model the
    down_proj Hessian alone is 0.8 GB)."""
    out: dict[str, torch.Tensor] = {}
    for batch in passes:
        hessians = (_hessians(layer, batch, hidden, pos_ids, pos_emb, compute_dtype, replays)
                    if hidden is not None else [None] * len(batch))
        for group in batch:
            _quantize_group(layer, prefix, group, hessians.pop(0), replays, quantize_linear, out, metrics)
    return out


def _quantize_group(layer: nn.Module, prefix: str, group: tuple[str, ...], H: Optional[torch.Tensor],
                    replays: Optional[LayerReplays], quantize_linear: QuantizeLinear,
                    out: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
    """Quantize the linears of one group (sharing Hessian `H`) in place; their stored tensors
    go to `out`, their metrics to `metrics`."""
    for lin in group:
        module = layer.get_submodule(lin)
        W = module.weight.data.float()
        result = quantize_linear(prefix + lin, W, H)
        module.weight.data = result.weight.float()
        out.update({f"{prefix}{lin}.{k}": v.cpu() for k, v in result.tensors.items()})
        if replays is not None:
            replays.quantized.add(lin)
        short = lin.rsplit('.', 1)[-1]
        metrics.update({f"{short}.{k}": v for k, v in result.metrics.items()})
        metrics.update({f"{short}.{k}": v for k, v in error_metrics(W, module.weight.data, H).items()})


def _restore_layer(layer: nn.Module, prefix: str, family: Family, shard: Path, restore_linear: RestoreLinear,
                   device: torch.device) -> None:
    """Put a finished layer's stored result (its shard) into `layer`: the linears as their
    packed tensors decode, the other tensors (norms) as a transform left them."""
    stored = _load(shard)
    linear_names = {prefix + lin for lin in family.linears}
    for lin in family.linears:
        module = layer.get_submodule(lin)
        mine = {k[len(prefix + lin) + 1:]: v for k, v in stored.items() if k.startswith(prefix + lin + ".")}
        module.weight.data = restore_linear(prefix + lin, mine).to(device)
    for name, t in stored.items():
        if name.rsplit(".", 1)[0] not in linear_names:
            layer.get_parameter(name[len(prefix):]).data = t.float().to(device)


@torch.no_grad()
def transform_sequentially(merged_dir: Path, calibration_ids: torch.Tensor, family: Family,
                           transform_layer: TransformLayer, progress, on_layer: Callable[[int, dict[str, float]], None],
                           chunk: int = 8, compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
                           storage: str = "auto", storage_dtype: torch.dtype = torch.float32,
                           awq_search_windows: Optional[int] = None) -> int:
    """Run `transform_layer` on every decoder layer in turn, each layer's inputs computed by the
    transformed float layers before it (nothing is quantized, nothing stored here: the
    transform keeps its own per-layer results, e.g. AWQ's search, and resumes from them).
    `device`, `storage`, `storage_dtype`, `awq_search_windows`: as `quantize_sequentially`'s.

    Returns:
        The number of decoder layers.
    """
    device = torch.device(device)
    wmap = weight_map(merged_dir)
    config = read_config(merged_dir)
    runner = LayerwiseRunner(config, torch.float32, family)
    placement = choose_placement(config, tuple(calibration_ids.shape), storage_dtype, device, storage, chunk,
                                 0, False, awq_search_windows, "search")
    hidden, pos_ids, pos_emb = _first_inputs(runner, wmap, family, calibration_ids, device, placement,
                                             storage_dtype, chunk)
    for i in progress(range(len(runner.layers)), desc="search", unit="layer"):
        layer = runner.layers[i]
        runner.materialize(layer, _to(read_prefix(wmap, family.layer_prefix(i)), device), torch.float32)
        on_layer(i, transform_layer(i, layer, hidden, pos_ids, pos_emb))
        _forward(layer, hidden, pos_ids, pos_emb, compute_dtype)
        layer.to("meta")
        _release(device)
    return len(runner.layers)


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def _release(device: torch.device) -> None:
    release_freed_memory()
    if device.type == "cuda":  # the next layer's shapes are the same: the cache would be reused,
        torch.cuda.empty_cache()  # but an odd-sized first/last layer should not pin its blocks


def _first_inputs(runner: LayerwiseRunner, wmap: dict[str, Path], family: Family, calibration_ids: torch.Tensor,
                  device: torch.device = torch.device("cpu"), placement: Placement = "device",
                  storage_dtype: torch.dtype = torch.float32, chunk: int = 8):
    """(activations, position ids, position embeddings) entering the first decoder layer. The
    embedding stays on the CPU (a gather: nothing to gain from the device, and its table is
    the model's largest tensor); its output is stored chunk by chunk, so a full float32 set
    never exists besides the storage. The table keeps its stored dtype: a gather copies rows,
    so the rows cast to the storage dtype are the values a float32 table gives, without a
    float32 copy of the table (2 GiB at a 128k x 4096 vocabulary)."""
    embed = runner.base.embed_tokens
    table = read_prefix(wmap, family.embed + ".")
    runner.materialize(embed, table, next(iter(table.values())).dtype)
    del table
    n, tokens = calibration_ids.shape
    hidden = Activations((n, tokens, embed.embedding_dim), storage_dtype, device, placement, chunk)
    for s in range(0, n, chunk):
        hidden.write(s, embed(calibration_ids[s : s + chunk]))
    hidden.sync()
    pos_ids = torch.arange(tokens, device=device).unsqueeze(0)
    rotary = runner.base.rotary_emb.to(device)
    # only the dtype and device of the first argument are read
    pos_emb = rotary(torch.zeros(1, dtype=torch.float32, device=device), position_ids=pos_ids)
    embed.to("meta")
    return hidden, pos_ids, pos_emb


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
