"""Stages `evaluate-<artifact>`: perplexity of one artifact on held-out domain and general text.

Perplexity = exp(summed next-token NLL over tokens 1..L-1 of every non-overlapping window /
number of predicted tokens); each window is an independent forward. The artifact is loaded
as it ships (the NF4 checkpoint through our `LinearNF4`), not as a float imitation.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from pipeline import data
from pipeline.checkpoints import DTYPES, dir_size, load_hf_model, load_int4_model, load_nf4_model
from pipeline.graph import StageContext, StageResult
from pipeline.models import resolve_model

VERSION = 1


def eval_device_dtype(cfg) -> tuple[str, torch.dtype]:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype == "auto":
        return device, (torch.bfloat16 if device == "cuda" else torch.float32)
    return device, DTYPES[cfg.dtype]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int, device: str, progress: Callable, desc: str) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) over `windows` [n, L]."""
    total_nll, total_tokens = 0.0, 0
    for start in progress(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens), total_tokens


def make_stage(artifact: str, loader: Callable[[StageContext, torch.dtype, str], tuple[object, Path]]):
    """A stage function evaluating `artifact`; `loader(ctx, dtype, device)` returns (model, its directory)."""

    def run(ctx: StageContext) -> StageResult:
        recipe = ctx.recipe
        device, dtype = eval_device_dtype(recipe.evaluate)
        streams = load_file(str(ctx.inputs["data"] / "tokens.safetensors"))
        seq_len = recipe.data.seq_len
        t0 = time.time()
        model, artifact_dir = loader(ctx, dtype, device)
        load_seconds = time.time() - t0
        metrics = {"size_bytes": float(dir_size(artifact_dir)), "load_seconds": round(load_seconds, 3)}
        quant_info = artifact_dir / "quantization.json"
        if quant_info.is_file():
            metrics["quantize_seconds"] = json.loads(quant_info.read_text())["seconds"]
        domain = data.windows(streams["domain_eval"], seq_len, recipe.evaluate.max_domain_windows)
        metrics["domain_ppl"], metrics["domain_tokens"] = perplexity(
            model, domain, recipe.evaluate.batch_size, device, ctx.progress, f"{artifact}: domain ppl")
        if "general_eval" in streams:
            general = data.windows(streams["general_eval"], seq_len, recipe.evaluate.max_general_windows)
            metrics["general_ppl"], metrics["general_tokens"] = perplexity(
                model, general, recipe.evaluate.batch_size, device, ctx.progress, f"{artifact}: general ppl")
        metrics = {k: float(v) for k, v in metrics.items()}
        result = {"artifact": artifact, "device": device, "dtype": str(dtype).replace("torch.", ""), **metrics}
        (ctx.output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        return StageResult(metrics=metrics, info={"artifact_dir": str(artifact_dir)})

    return run


def load_original_base(ctx: StageContext, dtype: torch.dtype, device: str):
    src = resolve_model(ctx.recipe.model)
    return load_hf_model(src, dtype, device), src


def load_base_nf4(ctx: StageContext, dtype: torch.dtype, device: str):
    src = ctx.inputs["base"]
    return load_nf4_model(src, dtype, device), src


def load_merged(ctx: StageContext, dtype: torch.dtype, device: str):
    src = ctx.inputs["merge"]
    return load_hf_model(src, dtype, device), src


def quantized_loader(name: str):
    def load(ctx: StageContext, dtype: torch.dtype, device: str):
        src = ctx.inputs[f"quantize-{name}"]
        return load_int4_model(src, dtype, device), src

    return load
