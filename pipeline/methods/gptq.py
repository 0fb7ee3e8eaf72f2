"""GPTQ: column-by-column rounding with the error carried by the inverse Hessian (qlora_quant.gptq)."""
from __future__ import annotations

import torch

from qlora_quant.gptq import gptq_quantize


def quantizer(entry, dtype):
    return lambda name, W, H: gptq_quantize(W, H, entry.bits, entry.group_size, entry.sym, entry.desc_act,
                                            entry.static_groups, entry.damp_percent, mse=entry.mse,
                                            scale_dtype=torch.float16)


def transform(entry, family, checkpoint_dir, dtype, search_dir=None):
    return None
