"""LLM.int8 of the merged model: row-wise absmax int8 (qlora_quant.int8), bitsandbytes'
serialization; no calibration."""
from __future__ import annotations

from qlora_quant.int8 import quantize_int8_rows


def quantizer(entry, dtype):
    return lambda name, W, H: quantize_int8_rows(W)


def transform(entry, family, checkpoint_dir, dtype, search_dir=None):
    return None
