"""Where an artifact's numbers were computed: the processor, its bf16 instruction path, the
threads, and the libraries that do the arithmetic.

The same code on the same weights gives perplexities that differ in the third or fourth digit
from one CPU to another (the README's demo table: 13.199 on a CPU with AMX, 13.190 on one with
AVX-512 BF16 only), and with the library versions. The evaluate stages record this beside their
figures, and the report says it, and flags a comparison of artifacts computed in different places.
Torch-free: the report, `compare` and `status` read these records without loading torch.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

from qlora_pipeline.codehash import installed_version
from qlora_pipeline.dtypes import CPUINFO

# /proc/cpuinfo flag -> what the report calls the CPU's bf16 path, best first
BF16_PATHS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))
LIBRARIES = ("torch", "transformers")


def _cpuinfo(cpuinfo: Path) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", set()) without one."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def cpu_description(cpuinfo: Path = CPUINFO) -> str:
    """The CPU as the report names it: its model and bf16 path, e.g. "AMD EPYC (AVX-512 BF16)"."""
    name, flags = _cpuinfo(cpuinfo)
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    path = next((label for flag, label in BF16_PATHS if flag in flags), "no native bf16")
    return f"{name} ({path})"


def compute_environment(device: str, threads: int, gpu_name: Optional[str] = None) -> dict[str, str]:
    """Where a stage computing on `device` ("cpu" or "cuda") with `threads` CPU threads runs:
    {"device", "processor", "threads", and a version per library of LIBRARIES}. On CUDA the
    processor is the GPU, `gpu_name`."""
    processor = (gpu_name or "unknown GPU") if device == "cuda" else cpu_description()
    env = {"device": device, "processor": processor, "threads": str(threads)}
    env.update({lib: installed_version(lib) for lib in LIBRARIES})
    return env


def describe(env: dict[str, str]) -> str:
    """One line: "cpu: AMD EPYC (AVX-512 BF16), 2 threads; torch 2.13.0, transformers 5.25.0"."""
    threads = f", {env['threads']} threads" if env.get("device") == "cpu" and "threads" in env else ""
    libraries = ", ".join(f"{lib} {env[lib]}" for lib in LIBRARIES if lib in env)
    return f"{env.get('device', '?')}: {env.get('processor', '?')}{threads}; {libraries}"
