"""AWQ: per-channel scales and per-group clipping searched on activations
(qlora_pipeline.layerwise.awq_search), folded into the layer; the scaled, clipped weights are
then rounded to nearest with plain min/max per group (the clip search has set the ranges)."""
from __future__ import annotations

import torch

from qlora_pipeline.layerwise.awq_search import AWQSettings, make_transform
from qlora_quant.gptq import rtn_quantize


def quantizer(entry):
    return lambda name, W, H: rtn_quantize(W, 4, entry.group_size, sym=False, scale_dtype=torch.float16)


def transform(entry, family, checkpoint_dir, dtype):
    settings = AWQSettings(entry.bits, entry.group_size, entry.awq.duo_scaling, entry.awq.clip, entry.awq.search_windows)
    return make_transform(family, settings, checkpoint_dir, dtype)
