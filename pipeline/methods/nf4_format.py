"""The bitsandbytes NF4 format (what `nf4` ships in): per linear `weight` (packed uint8) and
`weight.{absmax, quant_map, nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4}`,
with transformers' `quantization_config` for 4-bit NF4 + double quantization: byte for byte
what the base stage writes, and what transformers + bitsandbytes load with no code of ours.
Format facts: docs/formats.md#nf4-serialization.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_pipeline.layerwise.checkpoints import bnb_quantization_config
from qlora_pipeline.layerwise.engine import LinearResult
from qlora_quant.nf4 import NF4Tensor, dequantize_nf4, nf4_from_serialized, serialize_nf4

NAME = "bnb-nf4"
CONFIG_FILE = None  # bitsandbytes checkpoints carry only config.json's quantization_config


def pack(t: NF4Tensor, entry, H) -> LinearResult:
    return LinearResult(dequantize_nf4(t, torch.float32), serialize_nf4(t), {})


def restore(stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    return dequantize_nf4(nf4_from_serialized(stored), torch.float32)


def output_convention(checkpoint_dir: Path, n_layers: int, entry):
    return None, {"checkpoint_format": NAME}


def quantization_config(entry, meta: dict, convention: dict) -> dict:
    return bnb_quantization_config(entry.nf4)


def side_file(entry, qconfig: dict) -> None:
    return None
