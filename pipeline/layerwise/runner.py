"""Run a causal LM one decoder layer at a time, loading each layer's weights on demand.

Peak memory is one decoder layer plus the activations of the batch, whatever the depth:
this is how the merge verifies itself on a 70B model, and the engine the quantizers build on.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qlora_pipeline.layerwise.checkpoints import empty_model
from qlora_pipeline.layerwise.families import Family
from qlora_pipeline.layerwise.shards import release_freed_memory


class LayerwiseRunner:
    """A model skeleton with every parameter on the meta device; weights are given per layer.

    Args:
        config_dict: the checkpoint's config.json (any quantization_config is ignored).
        dtype: compute dtype.
        family: where the decoder layers, embedding, final norm and head live.
    """

    def __init__(self, config_dict: dict, dtype: torch.dtype, family: Family):
        self.model = empty_model(config_dict, dtype)
        self.dtype = dtype
        self.family = family
        self.layers: nn.ModuleList = self.model.get_submodule(family.layers_prefix)
        self.base = self.model.get_submodule(family.layers_prefix.rsplit(".", 1)[0])  # the decoder (embed, norm, rotary)

    def materialize(self, module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
        missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
        if unexpected or self.family.unexplained_missing(missing):
            raise ValueError(f"weights do not fit {type(module).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, weights_for: Callable[[str], dict[str, torch.Tensor]],
               linear_hook: Callable[[int, str, nn.Module], None] | None = None) -> torch.Tensor:
        """Full forward of `input_ids` [B, L] where `weights_for(prefix)` returns the tensors under
        a module prefix (the family's embedding, each layer's, the final norm's, the head's).

        `linear_hook(i, name, module)` may wrap a layer's linears after its weights are loaded
        (the merge uses it to add an unmerged LoRA term).
        """
        embed = self.base.embed_tokens
        self.materialize(embed, weights_for(self.family.embed + "."), self.dtype)
        hidden = embed(input_ids)
        position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        position_embeddings = self.base.rotary_emb(hidden, position_ids=position_ids)
        if not self.model.config.tie_word_embeddings:
            embed.to("meta")
        for i, layer in enumerate(self.layers):
            self.materialize(layer, weights_for(self.family.layer_prefix(i)), self.dtype)
            handles = []
            if linear_hook is not None:
                for name, module in layer.named_modules():
                    if isinstance(module, nn.Linear):
                        handles.append(linear_hook(i, name, module))
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids,
                           position_embeddings=position_embeddings)
            for h in handles:
                if h is not None:
                    h.remove()
            layer.to("meta")  # free the layer before loading the next one
            release_freed_memory()
        self.materialize(self.base.norm, weights_for(self.family.final_norm + "."), self.dtype)
        hidden = self.base.norm(hidden)
        head = self.model.lm_head
        if self.model.config.tie_word_embeddings:
            return hidden @ embed.weight.t()
        self.materialize(head, weights_for(self.family.head + "."), self.dtype)
        out = head(hidden)
        head.to("meta")
        return out
