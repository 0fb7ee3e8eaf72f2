"""What `dtype: auto` means where the compute runs.

bfloat16 on CUDA, and on CPUs that multiply bf16 natively (AVX-512 BF16 or AMX-BF16: oneDNN
runs a bf16 matmul about 4x faster than fp32 there; measured 259 vs 65 GFLOP/s on this
project's 2-core machine, [2048x576]x[576x1536]); float32 elsewhere, where bf16 is emulated
and slower. `QLP_CPU_BF16=0` (or `1`) overrides the CPU detection.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no detection, float32
        return frozenset()
    line = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return frozenset(line.group(1).split()) if line else frozenset()


def cpu_has_native_bf16() -> bool:
    override = os.environ.get("QLP_CPU_BF16")
    if override in ("0", "1"):
        return override == "1"
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


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
