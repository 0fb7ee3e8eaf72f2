"""Stage `merge`: dequantize the NF4 base with our own code, add the LoRA delta, write bf16.

Streams one decoder layer at a time (peak memory about one layer plus the adapter); each
merged layer is an intra-stage checkpoint shard, so a killed merge resumes at the next layer.
The merge base is `merge.into`: `dequantized` (the NF4 weights the adapter was trained
against) or `original` (the base model's own weights). The stage verifies itself: logits of
the merged checkpoint against the NF4 base + adapter on held-out windows.
"""
from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import data
from pipeline.checkpoints import DTYPES, copy_tokenizer, is_bnb_4bit, read_config, read_prefix, read_tensors, weight_map
from pipeline.errors import InputError
from pipeline.families import family_for
from pipeline.graph import StageContext, StageResult
from pipeline.layerwise import LayerwiseRunner
from pipeline.models import resolve_model
from pipeline.shards import REST_SHARD, SHARD, release_freed_memory, save_atomic, valid_shard, assemble_shards
from quant.nf4 import dequantize_nf4, nf4_from_state_tensors

VERSION = 1
VERIFY_WINDOWS = 4


class Adapter:
    """A standard PEFT LoRA adapter directory: per module prefix, the delta scaling * B @ A."""

    def __init__(self, path: Path):
        cfg_path = path / "adapter_config.json"
        if not cfg_path.is_file():
            raise InputError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        self.config = json.loads(cfg_path.read_text())
        if self.config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{path}: adapter type {self.config.get('peft_type')} is not LoRA")
        if self.config.get("use_dora"):
            raise InputError(f"{path}: DoRA adapters are not supported by merge")
        r, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        self.scaling = alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise InputError(f"{path}: no adapter_model.safetensors (save the adapter with safe_serialization=True)")
        tensors = load_file(str(weights))
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
        found: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            m = pattern.match(name)
            if m is None:
                raise InputError(f"{path}: unexpected tensor '{name}' in the adapter (only LoRA A/B weights are merged)")
            found.setdefault(m.group(1), {})[m.group(2)] = t
        for prefix, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise InputError(f"{path}: module {prefix} has lora_{'A' if 'A' in ab else 'B'} without its pair")
            self.pairs[prefix] = (ab["A"], ab["B"])

    def delta(self, prefix: str) -> torch.Tensor | None:
        if prefix not in self.pairs:
            return None
        a, b = self.pairs[prefix]
        d = (b.float() @ a.float()) * self.scaling  # [out, r] @ [r, in]
        return d.t() if self.fan_in_fan_out else d


def run(ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    base_dir = ctx.inputs["base"]
    adapter_dir = Path(recipe.merge.adapter).expanduser() if recipe.merge.adapter else ctx.inputs["train"]
    adapter = Adapter(adapter_dir)
    config = read_config(base_dir)
    family = family_for(config["model_type"])
    dtype = DTYPES[recipe.model.dtype]
    n_layers = int(config["num_hidden_layers"])
    base_map = weight_map(base_dir)

    original_map = None
    if recipe.merge.into == "original":
        src = resolve_model(recipe.model)
        if is_bnb_4bit(read_config(src)):
            raise InputError("merge.into: 'original' needs the base's float weights, but model.source is a "
                             "pre-quantized 4-bit checkpoint; use merge.into: dequantized")
        original_map = weight_map(src)

    linear_prefixes = {family.layer_prefix(i) + lin for i in range(n_layers) for lin in family.linears}
    unknown = sorted(set(adapter.pairs) - linear_prefixes)
    if unknown:
        raise InputError(f"merge.adapter: the adapter targets modules this merge does not handle: {unknown[:3]}")

    layer_re = re.compile(re.escape(family.layers_prefix) + r"\.(\d+)\.")
    plain_names = {n for n in base_map if ".weight." not in n and n.rsplit(".weight", 1)[0] not in linear_prefixes}
    max_delta = 0.0
    for i in ctx.progress(range(n_layers), desc="merge", unit="layer"):
        shard = ctx.checkpoint_dir / SHARD.format(i)
        if shard.exists() and valid_shard(shard):
            continue
        prefix = family.layer_prefix(i)
        out: dict[str, torch.Tensor] = {}
        for lin in family.linears:
            name = prefix + lin
            if original_map is not None:
                w = read_tensors(original_map, [f"{name}.weight"])[f"{name}.weight"].float()
            else:
                w = dequantize_nf4(_nf4_at(base_map, name), torch.float32)
            delta = adapter.delta(name)
            if delta is not None:
                w = w + delta
                max_delta = max(max_delta, delta.abs().max().item())
            out[f"{name}.weight"] = w.to(dtype)
            if f"{name}.bias" in base_map:
                out[f"{name}.bias"] = read_tensors(base_map, [f"{name}.bias"])[f"{name}.bias"].to(dtype)
        others = [n for n in plain_names if (m := layer_re.match(n)) and int(m.group(1)) == i]
        out.update(_plain_tensors(others, base_map, original_map, dtype))
        save_atomic(out, shard)
        release_freed_memory()

    rest_shard = ctx.checkpoint_dir / REST_SHARD
    if not (rest_shard.exists() and valid_shard(rest_shard)):
        rest = [n for n in plain_names if not layer_re.match(n)]
        save_atomic(_plain_tensors(rest, base_map, original_map, dtype), rest_shard)

    total_size = assemble_shards(ctx.checkpoint_dir, ctx.output_dir, n_layers)
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["dtype"] = recipe.model.dtype
    (ctx.output_dir / "config.json").write_text(json.dumps(out_config, indent=2))
    copy_tokenizer(base_dir, ctx.output_dir)

    verify = verify_merge(ctx, adapter, family)
    return StageResult(
        metrics={"size_bytes": float(total_size), "merged_modules": float(len(adapter.pairs)),
                 "max_abs_delta": max_delta, **verify},
        info={"adapter": str(adapter_dir), "into": recipe.merge.into},
    )


def _nf4_at(wmap: dict, name: str):
    keys = [k for k in wmap if k == f"{name}.weight" or k.startswith(f"{name}.weight.")]
    t = read_tensors(wmap, keys)
    state = {k[len(f"{name}.weight."):]: v for k, v in t.items() if k != f"{name}.weight"}
    return nf4_from_state_tensors(t[f"{name}.weight"], state)


def _plain_tensors(names, base_map, original_map, dtype) -> dict[str, torch.Tensor]:
    source = original_map if original_map is not None else base_map
    tensors = read_tensors(source, [n for n in names if n in source])
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


@torch.no_grad()
def verify_merge(ctx: StageContext, adapter: Adapter, family) -> dict[str, float]:
    """Largest |logit difference| between the merged bf16 checkpoint and NF4 base + unmerged
    LoRA (both in float32), on a few held-out windows. Both run one decoder layer at a time,
    so the check costs the memory of one layer, not of the model."""
    streams = load_file(str(ctx.inputs["data"] / "tokens.safetensors"))
    windows = data.windows(streams["domain_eval"], min(ctx.recipe.data.seq_len, 256), VERIFY_WINDOWS)
    merged_map, base_map = weight_map(ctx.output_dir), weight_map(ctx.inputs["base"])
    config = read_config(ctx.inputs["base"])
    runner = LayerwiseRunner(config, torch.float32, family.layers_prefix)

    def reference_weights(prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        quantized = {n.split(".weight.", 1)[0] for n in base_map if n.startswith(prefix) and ".weight." in n}
        for module in quantized:
            out[f"{module[len(prefix):]}.weight"] = dequantize_nf4(_nf4_at(base_map, module), torch.float32)
        plain = [n for n in base_map if n.startswith(prefix) and ".weight." not in n
                 and n.rsplit(".weight", 1)[0] not in quantized]
        out.update({n[len(prefix):]: t for n, t in read_tensors(base_map, plain).items()})
        return out

    def add_lora(i: int, name: str, module: torch.nn.Module):
        pair = adapter.pairs.get(f"{family.layer_prefix(i)}{name}")
        if pair is None:
            return None
        a, b = (t.float() for t in pair)
        return module.register_forward_hook(lambda mod, inp, out: out + (inp[0] @ a.t() @ b.t()) * adapter.scaling)

    merged_logits = runner.logits(windows, partial(read_prefix, merged_map))
    reference_logits = runner.logits(windows, reference_weights, add_lora)
    diff = (merged_logits - reference_logits).abs()
    return {"verify_max_abs_logit_diff": diff.max().item(), "verify_mean_abs_logit_diff": diff.mean().item(),
            "verify_logit_scale": reference_logits.abs().mean().item()}
