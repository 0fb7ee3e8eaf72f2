"""Whether a CUDA device is usable here, without importing torch, and what a quantize entry's
`device: auto` resolves to.

The stage registry puts the resolved device into the quantize stages' fingerprints (float math
on a GPU differs from the CPU's, so a result computed on one is not the other's), and
`validate`, `plan` and `status` build the registry without importing torch. The check reads
what a CUDA run needs: a torch build with CUDA (`torch/version.py`, read as text), an NVIDIA
driver with a GPU, and CUDA_VISIBLE_DEVICES not hiding every GPU. The quantize stage confirms
with torch itself before it computes (`require_cuda`), so a driver torch cannot use is an
error with one message, not a run on the wrong device under the cuda fingerprint.
"""
from __future__ import annotations

import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

from qlora_pipeline.errors import InputError


@lru_cache(maxsize=None)
def cuda_missing() -> Optional[str]:
    """None when a CUDA device looks usable; else why not, in words."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return "torch is not installed"
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return "torch's version.py is unreadable"
    found = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", text, re.MULTILINE)
    if found is None or found.group(1).strip() == "None":
        return "this torch build has no CUDA support"
    gpus = Path("/proc/driver/nvidia/gpus")
    if not ((gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))):
        return "no NVIDIA GPU or driver is present"
    return None


def resolve_device(setting: str) -> str:
    """A quantize entry's `device` ("auto", "cpu" or "cuda") as "cpu" or "cuda"."""
    if setting == "auto":
        return "cpu" if cuda_missing() else "cuda"
    return setting


def device_problem(setting: str, key: str) -> Optional[str]:
    """The preflight line for a `device: cuda` that cannot be honoured here, else None."""
    why = cuda_missing() if setting == "cuda" else None
    return f"{key}: cuda is requested but {why}; set {key}: auto (cuda when present) or cpu" if why else None


def require_cuda(what: str, key: str) -> None:
    """Torch's own word, before `what` computes on the device its fingerprint names."""
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"{what} computes on cuda ({key} asks for it, or auto found a CUDA torch build and an "
                         f"NVIDIA driver) but torch cannot use a CUDA device here; set {key}: cpu")
