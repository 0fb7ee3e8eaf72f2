"""Perplexity with an fp8 KV cache: keys (after the rotary embedding) and values rounded
through float8_e4m3fn before attention reads them, as a server with an fp8 KV cache stores them.

The rounding sits in the cache's `update`, which transformers' attention calls right after the
rotary embedding with the layer's new K/V and whose result (every cached position, the new ones
included) is what attention reads: every position attends to rounded keys and values, also
within the one forward of a perplexity window. Rounding: x -> fp8(clamp(x / s, ±448)) * s,
saturating at fp8's largest finite value (a plain cast would give NaN), with one scale s for
K and one for V per layer: 1.0, or amax / 448 over calibration windows (what a per-tensor fp8
scale calibrated on data is).
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from qlora_pipeline.scoring import perplexity, summed_nll

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def round_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` rounded to the nearest float8_e4m3fn value of x / scale (saturating), times scale, in x's dtype."""
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).to(x.dtype)


class Fp8KVCache(DynamicCache):
    """A dynamic cache that stores, and hands attention, K and V rounded through fp8 with the
    per-layer (key scale, value scale) of `scales`."""

    def __init__(self, scales: list[tuple[float, float]]):
        super().__init__()
        self.scales = scales

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_scale, v_scale = self.scales[layer_idx]
        return super().update(round_fp8(key_states, k_scale), round_fp8(value_states, v_scale), layer_idx,
                              *args, **kwargs)


class AmaxCache(DynamicCache):
    """A dynamic cache that records the largest |K| and |V| per layer in `amax` ([layers][2])."""

    def __init__(self, amax: list[list[float]]):
        super().__init__()
        self.amax = amax

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        seen = self.amax[layer_idx]
        seen[0] = max(seen[0], float(key_states.abs().max()))
        seen[1] = max(seen[1], float(value_states.abs().max()))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def calibrated_scales(model, windows: torch.Tensor, batch_size: int, device: str) -> list[tuple[float, float]]:
    """Per layer (amax(K) / 448, amax(V) / 448) over `windows` [n, L]."""
    amax = [[0.0, 0.0] for _ in range(model.config.num_hidden_layers)]
    summed_nll(model, windows, batch_size, device, cache=lambda: AmaxCache(amax))
    tiny = torch.finfo(torch.float32).tiny
    return [(max(k, tiny) / FP8_MAX, max(v, tiny) / FP8_MAX) for k, v in amax]


def fp8_kv_perplexities(model, windows: torch.Tensor, calibration: torch.Tensor, batch_size: int, device: str,
                        progress: Callable, desc: str) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Perplexity of `windows` with fp8 K/V at scale 1.0 and at scales calibrated on `calibration`
    (which must not be the evaluated split): ({kv_fp8_domain_ppl, kv_fp8_calibrated_domain_ppl}, the scales)."""
    layers = model.config.num_hidden_layers
    unit = [(1.0, 1.0)] * layers
    plain, _ = perplexity(model, windows, batch_size, device, progress, f"{desc}: fp8 KV ppl",
                          cache=lambda: Fp8KVCache(unit))
    scales = calibrated_scales(model, calibration, batch_size, device)
    calibrated, _ = perplexity(model, windows, batch_size, device, progress, f"{desc}: calibrated fp8 KV ppl",
                               cache=lambda: Fp8KVCache(scales))
    return {"kv_fp8_domain_ppl": plain, "kv_fp8_calibrated_domain_ppl": calibrated}, scales
