"""NF4 with double quantization of the merged model: the base stage's NF4 (qlora_quant.nf4), in
bitsandbytes' serialization, with the entry's `nf4.blocksize`; no calibration."""
from __future__ import annotations

from qlora_quant.nf4 import quantize_nf4


def quantizer(entry, dtype):
    # The quant state records `dtype` (the checkpoint's float dtype) as the weight's dtype, as the base stage does.
    return lambda name, W, H: quantize_nf4(W.to(dtype), entry.nf4.blocksize)


def transform(entry, family, checkpoint_dir, dtype, search_dir=None):
    return None
