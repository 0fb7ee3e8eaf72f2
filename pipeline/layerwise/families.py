"""Architecture knowledge as data: the linears of a decoder layer, per model family.

Llama first; Mistral and Qwen2 share its module names. GPTQ's sequential groups and AWQ's
scaling groups are tables here, keyed by the same relative module names.
"""
from __future__ import annotations

from dataclasses import dataclass

from qlora_pipeline.errors import InputError


@dataclass(frozen=True)
class ScalingGroup:
    """AWQ: linears that read one input and are scaled together (x s on their input columns),
    the op that absorbs 1/s, and the block whose output the scale search compares."""

    prev_op: str  # a norm (weight /= s) or a linear (output rows /= s)
    linears: tuple[str, ...]
    inspect: str  # a module of the layer; the attention module is called with the layer's kwargs
    # Apply only when these two weights have the same shape (v_proj -> o_proj is not a valid
    # fold under grouped-query attention, where v_proj has fewer output rows than o_proj's inputs).
    same_shape: tuple[str, str] | None = None


@dataclass(frozen=True)
class Replay:
    """A module of the decoder layer whose output is exactly its last linear applied to that
    linear's input (nothing after it): once that input has been captured with every earlier
    linear of the module quantized, the module's output for the same windows is that linear
    applied to the captured input, and the engine computes only that (GPTQ's true-sequential
    passes run each layer up to five times; most of it is recomputing these)."""

    module: str
    last_linear: str
    returns_tuple: bool  # the module returns (output, extras): attention returns its weights too


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_prefix: str  # decoder layer i lives under f"{layers_prefix}.{i}."
    linears: tuple[str, ...]  # linear modules inside one decoder layer, relative names
    # GPTQ true-sequential order: each group is quantized after the ones before it, and the
    # linears of a group read the same input (one Hessian per group).
    sequential_groups: tuple[tuple[str, ...], ...]
    attention: str  # the attention module (called with position embeddings, not a plain input)
    awq_groups: tuple[ScalingGroup, ...]
    awq_no_clip: tuple[str, ...]  # linears AWQ does not clip (q/k: attention logits are sensitive)
    replays: tuple[Replay, ...] = ()
    # Each linear's input size, as the config key it equals ("attention_size": attention heads x
    # head dim, which is not hidden_size in every model): group sizes must divide it.
    linear_inputs: tuple[tuple[str, str], ...] = ()
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"  # absent from checkpoints whose head is tied to the embedding

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."

    def in_layers(self, tensor_name: str) -> bool:
        return tensor_name.startswith(self.layers_prefix + ".")

    def linear_in_features(self, config: dict) -> dict[str, int]:
        """Input size of each linear of a decoder layer (relative names), from `config.json`."""
        heads = int(config.get("num_attention_heads", 1))
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        sizes = {"hidden_size": int(config["hidden_size"]), "intermediate_size": int(config["intermediate_size"]),
                 "attention_size": heads * head_dim}
        return {linear: sizes[size] for linear, size in self.linear_inputs}

    def linear_names(self, config: dict) -> list[tuple[str, str]]:
        """(full module name, name within the layer) of every quantized linear:
        (`model.layers.3.mlp.down_proj`, `mlp.down_proj`)."""
        return [(self.layer_prefix(i) + linear, linear)
                for i in range(int(config["num_hidden_layers"])) for linear in self.linears]

    def unexplained_missing(self, missing: list[str], quantized_modules=frozenset()) -> list[str]:
        """The keys of `missing` (from `load_state_dict`) that a checkpoint should have held: a
        tied head's weight and the float weights of modules replaced by quantized ones are not."""
        return [k for k in missing
                if not k.endswith(f"{self.head}.weight") and k.rpartition(".")[0] not in quantized_modules]


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
    attention="self_attn",
    awq_groups=(
        ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj",
                     same_shape=("self_attn.v_proj", "self_attn.o_proj")),
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    # LlamaAttention ends with `o_proj(attn_output)` and returns (output, weights); LlamaMLP is
    # `down_proj(act(gate_proj(x)) * up_proj(x))`.
    replays=(Replay("self_attn", "self_attn.o_proj", returns_tuple=True),
             Replay("mlp", "mlp.down_proj", returns_tuple=False)),
    linear_inputs=(
        ("self_attn.q_proj", "hidden_size"), ("self_attn.k_proj", "hidden_size"), ("self_attn.v_proj", "hidden_size"),
        ("self_attn.o_proj", "attention_size"),
        ("mlp.gate_proj", "hidden_size"), ("mlp.up_proj", "hidden_size"), ("mlp.down_proj", "intermediate_size"),
    ),
)

FAMILIES = (LLAMA,)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise InputError(f"model type '{model_type}' is not supported yet; supported: {', '.join(supported)}")
