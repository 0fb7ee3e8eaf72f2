"""Architecture knowledge as data: the linears of a decoder layer, per model family.

Llama first; Mistral and Qwen2 share its module names. Later stages (GPTQ's sequential
groups, AWQ's scaling groups) add their tables here, keyed the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_prefix: str  # decoder layer i lives under f"{layers_prefix}.{i}."
    linears: tuple[str, ...]  # linear modules inside one decoder layer, relative names
    # GPTQ true-sequential order: each group is quantized after the ones before it, and the
    # linears of a group read the same input (one Hessian per group).
    sequential_groups: tuple[tuple[str, ...], ...]

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers_prefix="model.layers",
    linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ),
    sequential_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

FAMILIES = (LLAMA,)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise InputError(f"model type '{model_type}' is not supported yet; supported: {', '.join(supported)}")
