"""AWQ on one decoder layer: capture the scaling groups' inputs, search the scales, fold them,
search the clipping on the folded weights, save the search result, clip.

The math is in `quant/awq.py`; this module runs it on a layer's modules. Search and apply are
separate: the search result (one scale vector per scaling group, one clip tensor per clipped
linear) is written to `awq-XXXXX.safetensors` before it is applied, so a stage killed after
the search resumes by applying the saved result, not by searching again.

The layer's weights stay float32, and so do the statistics (X^T X, channel means) and the clip
search; its forwards (the capture and every candidate's block) run in the entry's compute dtype
(autocast; float32 by default: bf16 made the search 1.5x faster and its results clearly worse,
README "Where AWQ searches"). The norms that absorb 1/s are rounded to the checkpoint
dtype as soon as they are folded, so every later step (clip search, GPTQ, the next layer's
inputs) sees the values the checkpoint will hold.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from safetensors import safe_open
from torch import nn

from qlora_pipeline.compute import compute_context
from qlora_pipeline.errors import StageError
from qlora_pipeline.layerwise.families import Family, ScalingGroup
from qlora_pipeline.layerwise.shards import save_atomic, valid_shard
from qlora_quant.awq import (
    clip_weight, linear_loss_from_hessian, linear_loss_from_inputs, scaled_gram_blocks, scaled_gram_blocks_from_inputs,
    scaled_quantized, search_clip, search_scales, weight_channel_mean,
)

SEARCH_FILE = "awq-{:05d}.safetensors"


class AWQSettings(NamedTuple):
    bits: int
    group_size: int
    duo_scaling: bool
    clip: bool
    search_windows: int  # calibration windows the block-output losses are measured on


@dataclass
class GroupInput:
    """What the search needs of a scaling group's input, accumulated over all calibration
    windows: X^T X and sum |x| per channel, plus the raw inputs of the first windows when the
    inspected block is not a single linear (its loss needs a real forward). With fewer
    calibration tokens than input channels, the inputs X themselves are kept instead of X^T X
    (`keep_rows`): smaller, and the losses and Gram blocks are cheaper from X
    (`qlora_quant.awq`'s notes)."""

    keep_rows: bool = False
    xtx: Optional[torch.Tensor] = None
    abs_sum: Optional[torch.Tensor] = None
    n: int = 0
    samples: Optional[torch.Tensor] = None
    row_chunks: list = field(default_factory=list)

    def add(self, x: torch.Tensor, keep: int) -> None:
        with torch.autocast(x.device.type, enabled=False):  # the statistics in float32, whatever the forward's dtype
            self._add(x, keep)

    def _add(self, x: torch.Tensor, keep: int) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(flat.shape[1], device=flat.device)
            if not self.keep_rows:
                self.xtx = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
        if self.keep_rows:
            self.row_chunks.append(flat.clone())
        else:
            self.xtx.addmm_(flat.t(), flat)
        self.abs_sum += flat.abs().sum(dim=0)
        self.n += flat.shape[0]
        if keep > 0:
            taken = x[:keep].detach().float().clone()
            self.samples = taken if self.samples is None else torch.cat([self.samples, taken])

    @property
    def rows(self) -> torch.Tensor:
        if len(self.row_chunks) > 1:
            self.row_chunks = [torch.cat(self.row_chunks)]
        return self.row_chunks[0]

    def linear_loss(self, D: torch.Tensor) -> float:
        """mean over tokens and outputs of (x D^T)^2."""
        return linear_loss_from_inputs(D, self.rows) if self.keep_rows else linear_loss_from_hessian(D, self.xtx, self.n)

    def clip_grams(self, s: torch.Tensor, group_size: int) -> torch.Tensor:
        """The diagonal blocks of the Gram matrix of the inputs divided by s."""
        if self.keep_rows:
            return scaled_gram_blocks_from_inputs(self.rows, s, group_size)
        return scaled_gram_blocks(self.xtx, self.n, s, group_size)


def active_groups(layer: nn.Module, family: Family) -> list[ScalingGroup]:
    groups = []
    for g in family.awq_groups:
        if g.same_shape is not None:
            a, b = (layer.get_submodule(n).weight.shape for n in g.same_shape)
            if a != b:
                continue
        groups.append(g)
    return groups


class _Kwargs(NamedTuple):
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


def _needs_samples(layer: nn.Module, g: ScalingGroup) -> bool:
    return not (g.inspect in g.linears and len(g.linears) == 1)


def capture(layer: nn.Module, groups: list[ScalingGroup], hidden, kw: _Kwargs, search_windows: int,
            compute_dtype: torch.dtype = torch.float32) -> list[GroupInput]:
    """One forward of the float layer over every calibration window (`hidden`: the engine's
    `Activations`, chunks handed over on the layer's device), recording each group's input
    (raw samples only for the groups that will be searched with a block forward)."""
    tokens = hidden.data.shape[0] * hidden.data.shape[1]
    inputs = [GroupInput(keep_rows=tokens < layer.get_submodule(g.linears[0]).in_features) for g in groups]
    taken = 0
    handles = []
    for k, g in enumerate(groups):
        def hook(mod, inp, k=k, g=g):
            keep = max(0, min(inp[0].shape[0], search_windows - taken)) if _needs_samples(layer, g) else 0
            inputs[k].add(inp[0].detach(), keep)
        handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(hook))
    try:
        for _, batch in hidden.batches():
            with compute_context(compute_dtype, batch.device.type):
                layer(batch, attention_mask=None, position_ids=kw.position_ids,
                      position_embeddings=kw.position_embeddings)
            taken += batch.shape[0]
    finally:
        for h in handles:
            h.remove()
    return inputs


def _run_block(module: nn.Module, is_attention: bool, x: torch.Tensor, kw: _Kwargs,
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with compute_context(compute_dtype, x.device.type):
        return _block_forward(module, is_attention, x, kw)


def _block_forward(module: nn.Module, is_attention: bool, x: torch.Tensor, kw: _Kwargs) -> torch.Tensor:
    if is_attention:
        return module(hidden_states=x, attention_mask=None, position_ids=kw.position_ids,
                      position_embeddings=kw.position_embeddings)[0]
    return module(x)


def _block_loss(module: nn.Module, is_attention: bool, samples: torch.Tensor, reference: list[torch.Tensor],
                kw: _Kwargs, chunk: int, compute_dtype: torch.dtype) -> float:
    total, count = 0.0, 0
    for j, s in enumerate(range(0, samples.shape[0], chunk)):
        out = _run_block(module, is_attention, samples[s : s + chunk], kw, compute_dtype)
        total += float(((out.float() - reference[j]) ** 2).sum())
        count += out.numel()
    return total / count


@torch.no_grad()
def search_layer_scales(layer: nn.Module, family: Family, all_inputs: list[GroupInput], settings: AWQSettings,
                        kw: _Kwargs, chunk: int, compute_dtype: torch.dtype = torch.float32
                        ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The scales of every active group, searched on the unmodified layer. `all_inputs` holds the
    input of every group of `family.awq_groups`, active or not.

    Returns:
        ({"scales.<prev_op>": [in]}, metrics).
    """
    result: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    active = active_groups(layer, family)
    for g, inp in zip(family.awq_groups, all_inputs):
        if g not in active:
            continue
        linears = [layer.get_submodule(n) for n in g.linears]
        originals = [m.weight.data.clone() for m in linears]
        x_mean = inp.abs_sum / inp.n
        w_mean = weight_channel_mean(originals, settings.group_size) if settings.duo_scaling else None
        if not _needs_samples(layer, g):
            W = originals[0]

            def loss_of(s, W=W, inp=inp):
                return inp.linear_loss(W - scaled_quantized(W, s, settings.bits, settings.group_size))
        else:
            block = layer.get_submodule(g.inspect)
            is_attention = g.inspect == family.attention
            reference = [_run_block(block, is_attention, inp.samples[s : s + chunk], kw, compute_dtype).float()
                         for s in range(0, inp.samples.shape[0], chunk)]

            def loss_of(s, block=block, is_attention=is_attention, samples=inp.samples, reference=reference):
                for m, W in zip(linears, originals):
                    m.weight.data = scaled_quantized(W, s, settings.bits, settings.group_size)
                try:
                    return _block_loss(block, is_attention, samples, reference, kw, chunk, compute_dtype)
                finally:
                    for m, W in zip(linears, originals):
                        m.weight.data = W
        found = search_scales(x_mean, w_mean, loss_of)
        result[f"scales.{g.prev_op}"] = found.scales
        metrics[f"awq.{g.prev_op}.ratio"] = found.ratio
        metrics[f"awq.{g.prev_op}.loss"] = found.loss
        # s = 1 is not on the grid (with the duo statistic even ratio 0 scales): the loss of
        # plain rounding, so that the gain of the search shows per layer.
        metrics[f"awq.{g.prev_op}.loss_unscaled"] = float(loss_of(torch.ones_like(x_mean)))
    return result, metrics


@torch.no_grad()
def search_layer_clip(layer: nn.Module, family: Family, all_inputs: list[GroupInput], scales: dict[str, torch.Tensor],
                      settings: AWQSettings) -> dict[str, torch.Tensor]:
    """Clip values of every clipped linear, searched on the layer *after* all scales are folded
    (a linear can be scaled twice: on its input columns by its own group, on its output rows by
    the next group, as up_proj is by down_proj's), with the inputs divided by their scales.

    Returns:
        {"clip.<linear>": [out, groups]}.
    """
    result = {}
    by_linear = {n: (g, inp) for g, inp in zip(family.awq_groups, all_inputs) for n in g.linears}
    for name in family.linears:
        # every linear but q/k, scaled or not (o_proj is not scaled under GQA)
        if name in family.awq_no_clip or name not in by_linear:
            continue
        g, inp = by_linear[name]
        s = scales.get(f"scales.{g.prev_op}", torch.ones_like(inp.abs_sum))
        grams = inp.clip_grams(s, settings.group_size)
        W = layer.get_submodule(name).weight.data.float()
        result[f"clip.{name}"] = search_clip(W, grams, settings.bits, settings.group_size)
    return result


@torch.no_grad()
def apply_scales(layer: nn.Module, groups: list[ScalingGroup], result: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Fold every group's scales into its prev op (1/s) and its linears (s)."""
    for g in groups:
        s = result[f"scales.{g.prev_op}"]
        prev = layer.get_submodule(g.prev_op)
        if isinstance(prev, nn.Linear):
            prev.weight.data = prev.weight.data / s.unsqueeze(1)
            if prev.bias is not None:
                prev.bias.data = prev.bias.data / s
        else:  # an RMSNorm / LayerNorm: y = w * norm(x) (+ b)
            prev.weight.data = (prev.weight.data / s).to(dtype).float()
            if getattr(prev, "bias", None) is not None:
                prev.bias.data = (prev.bias.data / s).to(dtype).float()
        for n in g.linears:
            m = layer.get_submodule(n)
            m.weight.data = m.weight.data * s.unsqueeze(0)


@torch.no_grad()
def apply_clip(layer: nn.Module, result: dict[str, torch.Tensor]) -> None:
    for key, max_val in result.items():
        if key.startswith("clip."):
            m = layer.get_submodule(key[len("clip."):])
            m.weight.data = clip_weight(m.weight.data, max_val)


def make_transform(family: Family, settings: AWQSettings, checkpoint_dir: Path, dtype: torch.dtype, chunk: int = 8,
                   search: bool = True, compute_dtype: torch.dtype = torch.float32):
    """The engine's per-layer hook: search (or load the saved search from `checkpoint_dir`) and
    apply. With `search` False, `checkpoint_dir` holds a finished search (the output of an
    `awq-search` stage, read-only) and a missing layer is an error."""

    def transform(i: int, layer: nn.Module, hidden: torch.Tensor, position_ids, position_embeddings) -> dict[str, float]:
        groups = active_groups(layer, family)
        path = checkpoint_dir / SEARCH_FILE.format(i)
        metrics: dict[str, float] = {}
        if path.exists() and valid_shard(path, sealed=search):  # not searching: a published output
            device = next(layer.parameters()).device
            with safe_open(str(path), "pt") as st:
                result = {k: st.get_tensor(k).to(device) for k in st.keys()}
                metrics = json.loads((st.metadata() or {}).get("metrics", "{}"))
            apply_scales(layer, groups, result, dtype)
        elif not search:
            raise StageError(f"{path}: no AWQ search result for layer {i}; rerun its awq-search stage")
        else:
            kw = _Kwargs(position_ids, position_embeddings)
            inputs = capture(layer, list(family.awq_groups), hidden, kw, settings.search_windows, compute_dtype)
            result, metrics = search_layer_scales(layer, family, inputs, settings, kw, chunk, compute_dtype)
            apply_scales(layer, groups, result, dtype)
            if settings.clip:
                result.update(search_layer_clip(layer, family, inputs, result, settings))
            del inputs
            save_atomic({k: v.cpu() for k, v in result.items()}, path, metadata={"metrics": json.dumps(metrics)})
        apply_clip(layer, result)
        return metrics

    return transform
