"""The GPTQ checkpoint format (also what `rtn` and `awq+gptq` ship in).

Per linear: `qweight` (codes packed along input rows), `qzeros`, `scales`, `g_idx`. Zero
points stay true (v2) in the per-layer checkpoints; the output is written in the common v1
convention (stored zero = zero - 1) unless some zero is 0, which v1 cannot store (then
`checkpoint_format: gptq_v2`). Formats facts: docs/formats.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from qlora_pipeline.layerwise.engine import LinearResult
from qlora_pipeline.layerwise.shards import SHARD
from qlora_pipeline.methods import dynamic
from qlora_quant.gptq import GPTQResult
from qlora_quant.packing import GPTQPacked, dequantize_gptq, pack_gptq, unpack_along_rows, unpack_gptq

NAME = "gptq"
CONFIG_FILE = "quantize_config.json"  # AutoGPTQ's copy of the quantization_config


def pack(res: GPTQResult, entry, H) -> LinearResult:
    packed = pack_gptq(res.codes, res.zeros, res.scales, res.g_idx, entry.bits, v1=False)
    metrics = {"loss": res.loss}
    if H is not None:
        metrics["damp_percent"] = res.damp_percent
    return LinearResult(res.Q, packed._asdict(), metrics)


def restore(stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The weight a finished layer computes with, from its checkpoint shard (true zeros)."""
    packed = GPTQPacked(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"])
    return dequantize_gptq(packed, bits, v1=False)


def output_convention(checkpoint_dir: Path, n_layers: int, entry):
    """(shard transform for the output or None, the `quantization_config` fields it implies)."""
    def bits(module: str) -> int:
        return dynamic.module_entry(entry, module).bits

    v1 = entry.sym or not any(_has_zero_zero(checkpoint_dir / SHARD.format(i), bits) for i in range(n_layers))
    transform = (lambda tensors: _to_v1(tensors, bits)) if v1 else None
    return transform, {"checkpoint_format": "gptq" if v1 else "gptq_v2"}


def quantization_config(entry, meta: dict, convention: dict) -> dict:
    qconfig = {
        "quant_method": "gptq", "bits": entry.bits, "group_size": entry.group_size, "desc_act": entry.desc_act,
        "sym": entry.sym, "static_groups": entry.static_groups, "true_sequential": entry.true_sequential,
        "damp_percent": entry.damp_percent, "checkpoint_format": convention["checkpoint_format"],
        "pack_dtype": "int32", "lm_head": False, "meta": meta,
    }
    if entry.dynamic:  # GPTQModel's per-module overrides, which vLLM and our loader read
        qconfig["dynamic"] = dynamic.as_config(entry.dynamic)
    return qconfig


def side_file(entry, qconfig: dict) -> dict:
    return qconfig


def _has_zero_zero(shard: Path, bits: Callable[[str], int]) -> bool:
    """`bits(module)`: the bit width of a module's codes."""
    with safe_open(shard, "pt") as st:
        for k in st.keys():
            if k.endswith(".qzeros"):
                if (unpack_along_rows(st.get_tensor(k).t().contiguous(), bits(k[: -len(".qzeros")])) == 0).any():
                    return True
    return False


def _to_v1(tensors: dict[str, torch.Tensor], bits: Callable[[str], int]) -> dict[str, torch.Tensor]:
    """qzeros from true zeros (v2) to the v1 convention (zero - 1)."""
    for k in [k for k in tensors if k.endswith(".qzeros")]:
        prefix = k[: -len(".qzeros")]
        packed = GPTQPacked(tensors[f"{prefix}.qweight"], tensors[k], tensors[f"{prefix}.scales"], tensors[f"{prefix}.g_idx"])
        codes, zeros = unpack_gptq(packed, bits(prefix), v1=False)
        tensors[k] = pack_gptq(codes, zeros, packed.scales, packed.g_idx, bits(prefix), v1=True).qzeros
    return tensors
