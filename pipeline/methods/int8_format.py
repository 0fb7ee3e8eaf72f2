"""The bitsandbytes LLM.int8 format (what `int8` ships in): per linear `weight` (int8 [out, in]),
`SCB` (float32 [out], the row absmax) and `weight_format` (uint8 0: row-major), with
transformers' `quantization_config` for 8-bit (`llm_int8_threshold` 6.0): what transformers +
bitsandbytes save for an 8-bit model, and load with no code of ours. The evaluation loads it
that way too: LLM.int8's arithmetic (int8 activations, float16 outlier columns) is
bitsandbytes' own, so the artifact is measured as it computes when shipped.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_pipeline.layerwise.engine import LinearResult
from qlora_quant.int8 import Int8Rows, dequantize_int8_rows

NAME = "bnb-int8"
CONFIG_FILE = None  # bitsandbytes checkpoints carry only config.json's quantization_config


def pack(q: Int8Rows, entry, H) -> LinearResult:
    return LinearResult(dequantize_int8_rows(q), {"weight": q.codes, "SCB": q.absmax,
                                                  "weight_format": torch.tensor(0, dtype=torch.uint8)}, {})


def restore(stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    return dequantize_int8_rows(Int8Rows(stored["weight"], stored["SCB"]))


def output_convention(checkpoint_dir: Path, n_layers: int, entry):
    return None, {"checkpoint_format": NAME}


def quantization_config(entry, meta: dict, convention: dict) -> dict:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True).to_dict()


def side_file(entry, qconfig: dict) -> None:
    return None
