"""AWQ: per-channel scales and per-group clipping searched on activations
(qlora_pipeline.layerwise.awq_search), folded into the layer; the scaled, clipped weights are
then rounded to nearest with plain min/max per group (the clip search has set the ranges)."""
from __future__ import annotations

import torch

from qlora_pipeline.compute import DTYPES
from qlora_pipeline.dtypes import quantize_dtype_name
from qlora_pipeline.layerwise.awq_search import AWQSettings, make_transform
from qlora_quant.gptq import rtn_quantize


def quantizer(entry, dtype):
    return lambda name, W, H: rtn_quantize(W, 4, entry.group_size, sym=False, scale_dtype=torch.float16)


def settings(entry) -> AWQSettings:
    return AWQSettings(entry.bits, entry.group_size, entry.awq.duo_scaling, entry.awq.clip, entry.awq.search_windows)


def transform(entry, family, checkpoint_dir, dtype, search_dir=None):
    """Apply the finished search in `search_dir` (an awq-search stage's output); without one,
    search here, on the inputs the layers quantized so far produce."""
    if search_dir is not None:
        return make_transform(family, settings(entry), search_dir, dtype, search=False)
    return make_transform(family, settings(entry), checkpoint_dir, dtype,
                          compute_dtype=DTYPES[quantize_dtype_name(entry.compute_dtype)])
