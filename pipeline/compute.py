"""What `dtype: auto` means where the compute runs, and the layer engine's compute context.

`auto` is bfloat16 on CUDA and float32 on the CPU. On this project's 2-core AVX-512-BF16
machine the default recipe in bf16 ran slower, not faster: training 228 s against 140 s, each
evaluation about 97 s against 60 s, GPTQ 120 s against 84 s (two full runs of
recipes/smollm2_domain.yaml), and with this torch a bf16 matmul of the model's shapes runs at
about half the float32 rate (scripts/bench_cpu_bf16.py; README "CPU bf16"). bf16 stays
selectable per section (`train.dtype`, `evaluate.dtype`, a quantize entry's `compute_dtype`).
"""
from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def auto_dtype(device: str, cuda_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The compute dtype `auto` stands for on `device` ("cuda" or "cpu")."""
    return cuda_dtype if device == "cuda" else torch.float32


def resolve_dtype(setting: str, device: str, cuda_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """A recipe dtype setting ("auto" or a dtype name) as a torch dtype on `device`."""
    return auto_dtype(device, cuda_dtype) if setting == "auto" else DTYPES[setting]


def compute_context(dtype: torch.dtype, device: str = "cpu"):
    """Autocast to `dtype` for forwards whose weights stay float32 (the layer engine: its
    quantizers and AWQ's scaling work on float32 weights); a no-op for float32."""
    if dtype == torch.float32:
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=dtype)
