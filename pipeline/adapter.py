"""A PEFT LoRA adapter read as tensors (`Adapter`: the merge's deltas) and put on a loaded model
unmerged (`attach_unmerged`: the `qlora` and `<name>+adapter` evaluations)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from qlora_pipeline.errors import InputError


class Adapter:
    """A standard PEFT LoRA adapter directory: per module prefix, the delta scaling * B @ A."""

    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "adapter_config.json"
        if not cfg_path.is_file():
            raise InputError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{cfg_path} is not valid JSON; it must be the adapter_config.json that PEFT writes") from None
        if not isinstance(self.config, dict):
            raise InputError(f"{cfg_path} is not a JSON object; it must be the adapter_config.json that PEFT writes")
        if self.config.get("peft_type", "LORA") != "LORA":
            raise InputError(f"{path}: adapter type {self.config.get('peft_type')} is not LoRA")
        if self.config.get("use_dora"):
            raise InputError(f"{path}: DoRA adapters are not supported by merge")
        r, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        self.scaling = alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise InputError(f"{path}: no adapter_model.safetensors (save the adapter with safe_serialization=True)")
        tensors = load_file(str(weights))
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
        found: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            m = pattern.match(name)
            if m is None:
                raise InputError(f"{path}: unexpected tensor '{name}' in the adapter (only LoRA A/B weights are merged)")
            found.setdefault(m.group(1), {})[m.group(2)] = t
        for prefix, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise InputError(f"{path}: module {prefix} has lora_{'A' if 'A' in ab else 'B'} without its pair")
            self.pairs[prefix] = (ab["A"], ab["B"])

    def delta(self, prefix: str) -> torch.Tensor | None:
        if prefix not in self.pairs:
            return None
        a, b = self.pairs[prefix]
        d = (b.float() @ a.float()) * self.scaling  # [out, r] @ [r, in]
        return d.t() if self.fan_in_fan_out else d


def attach_unmerged(model: torch.nn.Module, adapter: Adapter, device: str) -> None:
    """Put `adapter` on `model` unmerged, as training ran it: every targeted module's output
    gains scaling * B(A(x)), computed in float32 (`LoraLinearNF4`'s arithmetic, without
    dropout), whatever the module underneath (NF4, int4, int8, float)."""
    if adapter.fan_in_fan_out:
        raise InputError(f"{adapter.path}: a fan_in_fan_out adapter cannot be put on these linear layers")
    for prefix, (a, b) in adapter.pairs.items():
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise InputError(f"{adapter.path}: the adapter targets {prefix}, which the model does not have") from None
        a, b = a.float().to(device), b.float().to(device)
        module.register_forward_hook(
            lambda mod, inp, out, a=a, b=b: out + ((inp[0].to(a.dtype) @ a.t()) @ b.t() * adapter.scaling).to(out.dtype))
