"""Round-to-nearest: each group's min/max (or MSE-searched) range, no calibration. The baseline."""
from __future__ import annotations

import torch

from qlora_quant.gptq import rtn_quantize


def quantizer(entry, dtype):
    return lambda name, W, H: rtn_quantize(W, entry.bits, entry.group_size, entry.sym, entry.mse,
                                           scale_dtype=torch.float16)


def transform(entry, family, checkpoint_dir, dtype, search_dir=None):
    return None
