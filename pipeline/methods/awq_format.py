"""The AWQ GEMM checkpoint format (what `awq` ships in): 4-bit, zero points, 8 output columns
per int32 word in AWQ's interleaved order; `qweight`, `qzeros`, `scales` per linear, no
`g_idx`. Format facts: docs/formats.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_pipeline.layerwise.engine import LinearResult
from qlora_quant.gptq import GPTQResult
from qlora_quant.packing import AWQPacked, dequantize_awq, pack_awq

NAME = "awq-gemm"
CONFIG_FILE = "quant_config.json"  # AutoAWQ's legacy file


def pack(res: GPTQResult, entry, H) -> LinearResult:
    return LinearResult(res.Q, pack_awq(res.codes, res.zeros, res.scales)._asdict(), {})


def restore(stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    return dequantize_awq(AWQPacked(stored["qweight"], stored["qzeros"], stored["scales"]))


def output_convention(checkpoint_dir: Path, n_layers: int, entry):
    return None, {"checkpoint_format": NAME}


def quantization_config(entry, meta: dict, convention: dict) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": entry.group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None, "meta": meta}


def side_file(entry, qconfig: dict) -> dict:
    return {"zero_point": True, "q_group_size": entry.group_size, "w_bit": 4, "version": "GEMM"}
