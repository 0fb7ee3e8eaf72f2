"""PEFT glue: a LoRA layer for our `LinearNF4`, registered through peft's custom-module API,
so `get_peft_model` trains LoRA on the frozen NF4 base and `save_pretrained` writes a
standard adapter that plain peft loads onto an ordinary bf16 model."""
from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from qlora_kernels.nf4_linear import LinearNF4


class LoraLinearNF4(nn.Module, LoraLayer):
    """result = base(x) + lora_B(lora_A(dropout(x))) * scaling, for a frozen `LinearNF4` base."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x).to(lora_A.weight.dtype)
            result = result + (lora_B(lora_A(h)) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def attach_lora(model: nn.Module, target_modules: list[str], r: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap `model` (with `LinearNF4` or plain linears) in a PEFT model with fresh LoRA adapters."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM")
    config._register_custom_module({LinearNF4: LoraLinearNF4})
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")  # ours, registered above
        return get_peft_model(model, config)
