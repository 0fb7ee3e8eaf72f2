"""How a model is scored on token windows: the device and dtype evaluation runs in, and the
summed next-token NLL behind both the training-time validation loss and perplexity.

Each window [L] is an independent forward; tokens 1..L-1 are predicted.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import torch

from qlora_pipeline.compute import resolve_dtype


def eval_device_dtype(cfg) -> tuple[str, torch.dtype]:
    """(device, dtype) for the recipe's `evaluate` settings; `auto`: CUDA when present, in bf16;
    else the CPU in float32 (`compute.auto_dtype`)."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, resolve_dtype(cfg.dtype, device)


def cache_argument(model) -> str:
    """The name under which the model's forward takes a KV cache (`cache` since transformers 5.x,
    `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def summed_nll(model, windows: torch.Tensor, batch_size: int, device: str,
               progress: Optional[Callable] = None, desc: str = "",
               cache: Optional[Callable[[], Any]] = None) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over `windows` [n, L]; `cache()`, if
    given, makes the (empty) KV cache each batch's forward runs with."""
    total_nll, total_tokens = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in (progress(starts, desc=desc, unit="batch") if progress else starts):
        batch = windows[start : start + batch_size].to(device)
        extra = {} if cache is None else {cache_argument(model): cache(), "use_cache": True}
        logits = model(input_ids=batch, **extra).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return total_nll, total_tokens


def perplexity(model, windows: torch.Tensor, batch_size: int, device: str, progress: Callable, desc: str,
               cache: Optional[Callable[[], Any]] = None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) over `windows` [n, L]."""
    nll, tokens = summed_nll(model, windows, batch_size, device, progress, desc, cache)
    return math.exp(nll / tokens), tokens
