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


def returned_cache(output):
    """The KV cache a forward with `use_cache=True` returned (`cache` since transformers 5.x,
    `past_key_values` before; reading the old name warns in 5.x)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


# Positions whose logits exist at once. A whole batch's logits are batch x length x vocab, and
# the loss holds three float32 copies of them: 4 x 2048 x 128,256 x 12 bytes = 11.7 GiB for
# Llama-3, more than the 8B model's evaluation needs for everything else on a 24 GB card. The
# head and the loss run over this many positions at a time instead (1,024 x 128,256 x 10 bytes
# = 1.2 GiB); each position's logits and loss are the same numbers either way.
HEAD_CHUNK_POSITIONS = 1024


def body_and_head(model):
    """(decoder body, output head) when the model's logits are exactly head(body's last hidden
    state), as in every family `qlora_pipeline.layerwise.families` knows (Llama, Mistral, Qwen2);
    else None (the whole forward's logits are used)."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    # Families that post-process the head's output (soft-capping, a logit scale) are not chunked.
    if get_decoder is None or get_head is None or getattr(config, "final_logit_softcapping", None) \
            or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    body, head = get_decoder(), get_head()
    if body is None or head is None or body is model:
        return None
    return body, head


def _kv_arguments(forward_owner, kv_cache) -> dict:
    if kv_cache is None:
        return {"use_cache": False}  # a perplexity reads no cache back: do not build one
    return {cache_argument(forward_owner): kv_cache, "use_cache": True}


def _window_nll(model, batch: torch.Tensor, kv_cache=None) -> torch.Tensor:
    """Next-token NLL of each window of `batch` [B, L], summed over its L - 1 predicted tokens
    (float64 [B]); the forward runs with `kv_cache` when one is given."""
    targets = batch[:, 1:].reshape(-1)
    parts = body_and_head(model)
    if parts is None:
        logits = model(input_ids=batch, **_kv_arguments(model, kv_cache)).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, reduction="none")
    else:
        body, head = parts
        hidden = body(input_ids=batch, **_kv_arguments(body, kv_cache)).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        losses = torch.cat([
            torch.nn.functional.cross_entropy(head(hidden[start : start + HEAD_CHUNK_POSITIONS]).float(),
                                              targets[start : start + HEAD_CHUNK_POSITIONS], reduction="none")
            for start in range(0, hidden.shape[0], HEAD_CHUNK_POSITIONS)])
    return losses.double().view(batch.shape[0], -1).sum(dim=1).cpu()


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int, device: str,
                progress: Optional[Callable] = None, desc: str = "",
                cache: Optional[Callable[[], Any]] = None) -> torch.Tensor:
    """Each window's summed next-token NLL (float64 [n]) over `windows` [n, L]: what a
    perplexity is made of, and what a paired comparison of two models on the same windows
    needs (`qlora_pipeline.paired`). `cache()`, if given, makes the (empty) KV cache each
    batch's forward runs with."""
    parts = []
    starts = range(0, windows.shape[0], batch_size)
    for start in (progress(starts, desc=desc, unit="batch") if progress else starts):
        batch = windows[start : start + batch_size].to(device)
        parts.append(_window_nll(model, batch, None if cache is None else cache()))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def summed_nll(model, windows: torch.Tensor, batch_size: int, device: str,
               progress: Optional[Callable] = None, desc: str = "",
               cache: Optional[Callable[[], Any]] = None) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over `windows` [n, L]."""
    nlls = window_nlls(model, windows, batch_size, device, progress, desc, cache)
    return float(nlls.sum()), windows.shape[0] * (windows.shape[1] - 1)


def perplexity_of(nlls: torch.Tensor, window_length: int) -> float:
    """The perplexity of windows of `window_length` tokens whose summed NLLs are `nlls`."""
    return math.exp(float(nlls.sum()) / (nlls.numel() * (window_length - 1)))


def perplexity(model, windows: torch.Tensor, batch_size: int, device: str, progress: Callable, desc: str,
               cache: Optional[Callable[[], Any]] = None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) over `windows` [n, L]."""
    nlls = window_nlls(model, windows, batch_size, device, progress, desc, cache)
    return perplexity_of(nlls, windows.shape[1]), windows.shape[0] * (windows.shape[1] - 1)
