"""Stage `merge`: dequantize the NF4 base with our own code, add the LoRA delta, write bf16.

Streams one decoder layer at a time (peak memory about one layer plus the adapter); each
merged layer is an intra-stage checkpoint shard, so a killed merge resumes at the next layer.
The merge base is `merge.into`: `dequantized` (the NF4 weights the adapter was trained
against), `original` (the base model's own weights), or `auto`: both merges, each evaluated
on the domain validation windows (`domain_valid`, never the test split), the one with the
lower perplexity kept (`merge_choice.json` says which, why, and on which split). The stage
verifies itself: logits of the merged checkpoint against the weights it merged into + the
unmerged adapter on validation windows; it fails, publishing nothing, when they differ by more
than `merge.verify_max_logit_diff`.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from qlora_pipeline import data
from qlora_pipeline.adapter import Adapter
from qlora_pipeline.layerwise.checkpoints import (
    copy_tokenizer, is_bnb_4bit, is_nf4_state, nf4_modules, read_config, read_nf4, read_prefix, read_tensors,
    weight_map,
)
from qlora_pipeline.compute import DTYPES
from qlora_pipeline.errors import InputError, StageError
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.layerwise.runner import LayerwiseRunner
from qlora_pipeline.models import resolve_model, stage_model
from qlora_pipeline.recipe import EvaluateConfig, MergeConfig
from qlora_pipeline.layerwise.shards import REST_SHARD, SHARD, release_freed_memory, save_atomic, valid_shard, assemble_shards
from qlora_pipeline.stages.data import TOKENS_FILE
from qlora_quant.nf4 import dequantize_nf4

CHOICE_FILE = "merge_choice.json"  # merge.into: auto: which merge was kept, on which split, why
VERIFY_WINDOWS = 4


def run(ctx: StageContext) -> StageResult:
    cfg = MergeConfig.model_validate(ctx.config["merge"])
    adapter_dir = Path(cfg.adapter).expanduser() if cfg.adapter else ctx.inputs["train"]
    adapter = Adapter(adapter_dir)
    config = read_config(ctx.inputs["base"])
    family = family_for(config["model_type"])
    into = cfg.into
    extra: dict[str, float] = {}
    if into != "auto":
        total_size, max_delta = merge_into(ctx, adapter, family, into, ctx.checkpoint_dir, ctx.output_dir)
    else:
        results = {}
        for way in ("dequantized", "original"):
            out = ctx.checkpoint_dir / f"{way}-merged"
            if not (out / "config.json").exists():  # config.json is written last
                results[way] = merge_into(ctx, adapter, family, way, ctx.checkpoint_dir / way, out)
            ppl_file = ctx.checkpoint_dir / f"{way}-ppl.json"
            if not ppl_file.exists():
                ppl_file.write_text(json.dumps({"domain_ppl": _domain_ppl(ctx, out)}))
            extra[f"auto_{way}_domain_ppl"] = json.loads(ppl_file.read_text())["domain_ppl"]
        chosen = min(("dequantized", "original"), key=lambda w: extra[f"auto_{w}_domain_ppl"])
        other = "original" if chosen == "dequantized" else "dequantized"
        for f in (ctx.checkpoint_dir / f"{chosen}-merged").iterdir():
            f.replace(ctx.output_dir / f.name)
        total_size = sum(f.stat().st_size for f in ctx.output_dir.glob("*.safetensors"))
        max_delta = results.get(chosen, (0, float("nan")))[1]
        a, b = extra[f"auto_{chosen}_domain_ppl"], extra[f"auto_{other}_domain_ppl"]
        choice = {
            "chosen": chosen, "split": "domain_valid",
            "domain_ppl": {"dequantized": extra["auto_dequantized_domain_ppl"],
                           "original": extra["auto_original_domain_ppl"]},
            "reason": f"merging into the {chosen} weights gives validation domain perplexity {a:.4f}, "
                      f"{100 * (b / a - 1):.2f}% lower than into the {other} weights ({b:.4f})",
        }
        (ctx.output_dir / CHOICE_FILE).write_text(json.dumps(choice, indent=2))
        extra["auto_chose_original"] = float(chosen == "original")
        ctx.metrics.set_tags({"merge.into.chosen": chosen})
        into = chosen

    verify = verify_merge(ctx, adapter, family, into)
    try:
        check_verification(verify, cfg.verify_max_logit_diff, into)
    except StageError:
        _discard_progress(ctx.checkpoint_dir)  # a rerun merges afresh, not from the layers that failed
        raise
    metrics = {"size_bytes": float(total_size), "merged_modules": float(len(adapter.pairs)), **verify, **extra}
    if not math.isnan(max_delta):
        metrics["max_abs_delta"] = max_delta
    return StageResult(metrics=metrics, info={"adapter": str(adapter_dir), "into": into,
                                              "into_setting": cfg.into})


def _domain_ppl(ctx: StageContext, model_dir: Path) -> float:
    """Validation domain perplexity of a merged candidate (merge.into: auto), in float32 on
    the evaluation device, with the evaluate stages' window settings on `domain_valid`: the
    choice must not be made on the test split it is then reported on."""
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.scoring import eval_device_dtype, perplexity

    settings = dict(ctx.config["evaluate"])
    seq_len = settings.pop("seq_len")
    evaluate = EvaluateConfig.model_validate(settings)
    device, _ = eval_device_dtype(evaluate)
    streams = load_file(str(ctx.inputs["data"] / TOKENS_FILE))
    windows = data.windows(streams["domain_valid"], seq_len, evaluate.max_domain_windows)
    model = load_hf_model(model_dir, torch.float32, device)
    ppl, _ = perplexity(model, windows, evaluate.batch_size, device, ctx.progress, f"merge auto: {model_dir.name}")
    del model
    release_freed_memory()
    return ppl


def merge_into(ctx: StageContext, adapter: "Adapter", family, into: str, ckpt_dir: Path, out_dir: Path) -> tuple[int, float]:
    """Merge the adapter into the `into` weights ("dequantized" | "original"), one decoder layer
    at a time with per-layer checkpoints in `ckpt_dir`, and write the HF checkpoint to `out_dir`.

    Returns:
        (bytes written, largest |delta| of the layers merged by this call).
    """
    base_dir = ctx.inputs["base"]
    config = read_config(base_dir)
    dtype = DTYPES[ctx.config["dtype"]]
    n_layers = int(config["num_hidden_layers"])
    base_map = weight_map(base_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    original_map = None
    if into == "original":
        src = resolve_model(stage_model(ctx.config, ctx.runtime))
        if is_bnb_4bit(read_config(src, key="model.source")):
            raise InputError(f"merge.into: '{ctx.config['merge']['into']}' needs the base's float weights, but model.source is a "
                             "pre-quantized 4-bit checkpoint; use merge.into: dequantized")
        original_map = weight_map(src)

    linear_prefixes = {family.layer_prefix(i) + lin for i in range(n_layers) for lin in family.linears}
    unknown = sorted(set(adapter.pairs) - linear_prefixes)
    if unknown:
        raise InputError(f"merge.adapter: the adapter targets modules this merge does not handle: {unknown[:3]}")

    layer_re = re.compile(re.escape(family.layers_prefix) + r"\.(\d+)\.")
    plain_names = {n for n in base_map if not is_nf4_state(n) and n.rsplit(".weight", 1)[0] not in linear_prefixes}
    max_delta = 0.0
    for i in ctx.progress(range(n_layers), desc=f"merge into {into}", unit="layer"):
        shard = ckpt_dir / SHARD.format(i)
        if shard.exists() and valid_shard(shard):
            continue
        prefix = family.layer_prefix(i)
        out: dict[str, torch.Tensor] = {}
        for lin in family.linears:
            name = prefix + lin
            if original_map is not None:
                w = read_tensors(original_map, [f"{name}.weight"])[f"{name}.weight"].float()
            else:
                w = dequantize_nf4(read_nf4(base_map, name), torch.float32)
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

    rest_shard = ckpt_dir / REST_SHARD
    if not (rest_shard.exists() and valid_shard(rest_shard)):
        rest = [n for n in plain_names if not layer_re.match(n)]
        save_atomic(_plain_tensors(rest, base_map, original_map, dtype), rest_shard)

    total_size = assemble_shards(ckpt_dir, out_dir, n_layers)
    copy_tokenizer(base_dir, out_dir)
    out_config = {k: v for k, v in config.items() if k != "quantization_config"}
    out_config["dtype"] = ctx.config["dtype"]
    (out_dir / "config.json").write_text(json.dumps(out_config, indent=2))
    return total_size, max_delta


def _plain_tensors(names, base_map, original_map, dtype) -> dict[str, torch.Tensor]:
    source = original_map if original_map is not None else base_map
    tensors = read_tensors(source, [n for n in names if n in source])
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _discard_progress(checkpoint_dir: Path) -> None:
    """Remove the merge's layer shards and candidates; dot-files are the runner's bookkeeping."""
    for entry in checkpoint_dir.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_verification(verify: dict[str, float], limit: float, into: str) -> None:
    """Fail the stage when the merged checkpoint's logits stray from the reference by more
    than `limit` (merge.verify_max_logit_diff). A correct merge differs only by the rounding
    of the merged weights to model.dtype; a wrong one (a delta dropped, doubled, transposed,
    put on the wrong module) differs by whole logits.

    Raises:
        StageError: one line with both numbers and what to check (NaN fails too).
    """
    diff, scale = verify["verify_max_abs_logit_diff"], verify["verify_logit_scale"]
    if diff <= limit:
        return
    raise StageError(
        f"merge verification failed: the merged checkpoint's logits differ from the {into} base + unmerged adapter "
        f"by up to {diff:.4g}, over merge.verify_max_logit_diff = {limit:g} (mean |logit| {scale:.3g}); rounding "
        "alone stays far below that. Check that the adapter was trained on this model.source with these lora "
        "settings, or raise merge.verify_max_logit_diff if this model's logits are unusually large")


@torch.no_grad()
def verify_merge(ctx: StageContext, adapter: Adapter, family, into: str = "dequantized") -> dict[str, float]:
    """Largest |logit difference| between the merged checkpoint and the weights it was merged
    into (`into`: the dequantized NF4 base, or the original weights) + the unmerged LoRA, both
    in float32, on a few validation windows. Both run one decoder layer at a time, so the check
    costs the memory of one layer, not of the model.

    The reference is the merge's own base so that the difference is the merge's error alone:
    against the NF4 base, an `original` merge would also carry NF4's quantization error."""
    streams = load_file(str(ctx.inputs["data"] / TOKENS_FILE))
    windows = data.windows(streams["domain_valid"], min(ctx.config["seq_len"], 256), VERIFY_WINDOWS)
    merged_map, base_map = weight_map(ctx.output_dir), weight_map(ctx.inputs["base"])
    config = read_config(ctx.inputs["base"])
    runner = LayerwiseRunner(config, torch.float32, family)
    original_map = weight_map(resolve_model(stage_model(ctx.config, ctx.runtime))) if into == "original" else None

    def reference_weights(prefix: str) -> dict[str, torch.Tensor]:
        if original_map is not None:
            return read_prefix(original_map, prefix)
        out = {}
        quantized = nf4_modules(base_map, prefix)
        for module in quantized:
            out[f"{module[len(prefix):]}.weight"] = dequantize_nf4(read_nf4(base_map, module), torch.float32)
        plain = [n for n in base_map if n.startswith(prefix) and not is_nf4_state(n)
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
