"""What `dtype: auto` means where the compute runs: bfloat16 on CUDA and on CPUs that multiply
bf16 natively (`cpufeatures.cpu_has_native_bf16`), float32 elsewhere.
"""
from __future__ import annotations

import torch

from qlora_pipeline.cpufeatures import cpu_has_native_bf16

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def auto_dtype(device: str, cuda_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The compute dtype `auto` stands for on `device` ("cuda" or "cpu")."""
    if device == "cuda":
        return cuda_dtype
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(setting: str, device: str, cuda_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """A recipe dtype setting ("auto" or a dtype name) as a torch dtype on `device`."""
    return auto_dtype(device, cuda_dtype) if setting == "auto" else DTYPES[setting]


def compute_context(dtype: torch.dtype, device: str = "cpu"):
    """Autocast to `dtype` for forwards whose weights stay float32 (the layer engine: its
    quantizers and AWQ's scaling work on float32 weights); a no-op for float32."""
    if dtype == torch.float32:
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=dtype)
