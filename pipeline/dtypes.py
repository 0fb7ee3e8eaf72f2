"""What a compute dtype of `auto` resolves to, by name and without torch: the stage registry
puts the resolved name into fingerprints (a stage computed in bf16 is not the float32 one), and
`validate`, `plan` and `status` build the registry without importing torch. The reasons for the
choice are in `qlora_pipeline.compute`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=None)
def cpu_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU computes bf16 natively (a flag of NATIVE_BF16_FLAGS in /proc/cpuinfo).
    False where there is no /proc/cpuinfo (macOS, Windows): float32 is the safe choice there.
    QLP_CPU_BF16=0 or 1 overrides the detection."""
    forced = os.environ.get("QLP_CPU_BF16")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    try:
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def auto_dtype_name(device: str, cuda_dtype: str = "bfloat16") -> str:
    """The compute dtype `auto` stands for on `device` ("cuda" or "cpu"), by name (torch-free:
    the stage registry puts it into fingerprints)."""
    if device == "cuda":
        return cuda_dtype
    return "bfloat16" if cpu_native_bf16() else "float32"


def resolve_dtype_name(setting: str, device: str, cuda_dtype: str = "bfloat16") -> str:
    """A recipe dtype setting ("auto" or a dtype name) as a dtype name on `device`."""
    return auto_dtype_name(device, cuda_dtype) if setting == "auto" else setting


def quantize_dtype_name(setting: str) -> str:
    """A quantize entry's `compute_dtype` (its calibration forwards): `auto` is float32 on every
    device, so the setting as written already fingerprints it. With bf16 forwards on the CPU the
    default recipe's GPTQ took 62 s against 79, but the Hessians, so the weights, change: against
    float32 forwards (both evaluated in bf16) AWQ+GPTQ's general-text perplexity moved 1.3%
    (AWQ's domain one 0.4%), over the 0.5% bound this project set for the change (README "CPU
    bf16"; GPTQ's results are that sensitive to any change of summation order, which the bound
    does not forgive). AWQ's search forwards in bf16 (the capture and the scale grid's block
    losses) made the default recipe's search 1.5x faster (243 s against 367) and AWQ 0.9%,
    AWQ+GPTQ 1.3% worse on `domain_valid`, both clear of zero."""
    return "float32" if setting == "auto" else setting


def train_dtype_name(setting: str, device: str, cuda_dtype: str = "bfloat16") -> str:
    """`train.dtype` on `device`: `auto` is NF4's compute dtype on CUDA and float32 on the CPU,
    native bf16 or not. Trained in bf16 on the CPU, the default recipe's fine-tune came out
    different enough to move round-to-nearest's increase over it by 0.73 points (36.40% against
    37.13%, both evaluated in bf16), over the 0.5-point bound this project set for the change
    (README "CPU bf16")."""
    if setting != "auto":
        return setting
    return cuda_dtype if device == "cuda" else "float32"
