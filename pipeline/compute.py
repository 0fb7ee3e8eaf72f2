"""What `dtype: auto` means where the compute runs, and the layer engine's compute context.

Evaluation: `auto` is bfloat16 on CUDA; on the CPU bfloat16 where the CPU computes bf16
natively (AVX-512 BF16 or AMX: the `avx512_bf16` / `amx_bf16` flags of /proc/cpuinfo) and
float32 elsewhere (without them bf16 is emulated, slower than float32). Training on the CPU and
the layer engine's calibration forwards stay float32 (`qlora_pipeline.dtypes` has each rule
and the measurement behind it).

Measured on this project's 2-core AVX-512-BF16 machine with nothing else running
(scripts/bench_cpu_bf16.py, README "CPU bf16"): a bf16 matmul of the default model's MLP shape
runs at 409 GFLOP/s against 197 in float32, a SmolLM2-135M forward over 4 x 512 tokens takes
2.12 s against 4.09, an evaluation stage of the default recipe 67 s against 90; evaluated in
bf16, the same weights' perplexities move by at most 0.13% (base, NF4 base, merged,
round-to-nearest, GPTQ). An earlier measurement that found
bf16 no faster was taken while other jobs shared the two cores. float32 stays selectable
(`evaluate.dtype`), bf16 for the rest (`train.dtype`, a quantize entry's `compute_dtype`).
"""
from __future__ import annotations

import torch

from qlora_pipeline.dtypes import auto_dtype_name

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def auto_dtype(device: str, cuda_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The compute dtype `auto` stands for on `device` ("cuda" or "cpu")."""
    return cuda_dtype if device == "cuda" else DTYPES[auto_dtype_name("cpu")]


def resolve_dtype(setting: str, device: str, cuda_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """A recipe dtype setting ("auto" or a dtype name) as a torch dtype on `device`."""
    return auto_dtype(device, cuda_dtype) if setting == "auto" else DTYPES[setting]


def compute_context(dtype: torch.dtype, device: str = "cpu"):
    """Autocast to `dtype` for forwards whose weights stay float32 (the layer engine: its
    quantizers and AWQ's scaling work on float32 weights); a no-op for float32."""
    if dtype == torch.float32:
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=dtype)
