"""Whether this CPU multiplies bf16 natively, without importing torch (the stage registry
fingerprints the answer: `validate`, `plan` and `status` stay torch-free).

AVX-512 BF16 or AMX-BF16: oneDNN runs a bf16 matmul about 4x faster than fp32 there (measured
259 vs 65 GFLOP/s on this project's 2-core machine, [2048x576]x[576x1536]); elsewhere bf16 is
emulated and slower. `QLP_CPU_BF16=0` (or `1`) overrides the detection.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path


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
