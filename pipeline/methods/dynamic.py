"""Mixed precision per module: the `dynamic` mapping of a GPTQ checkpoint's quantization_config.

The convention GPTQModel writes and vLLM reads (docs/formats.md, "Per-module overrides"): each
key is a regular expression, optionally prefixed "+:", matched with `re.match` (anchored at the
start, not the end) against a linear's full module name such as `model.layers.3.mlp.down_proj`;
its value overrides `bits` and/or `group_size` for the modules it matches. Keys are tried in
order and the first match decides; a module no key matches uses the top-level settings. The
"-:" keys of that convention (leave a module in float) are not supported: our checkpoints
quantize every linear of every decoder layer.

A recipe's quantize entry carries the same mapping (`dynamic:`), so what a user writes is what
the checkpoint says. No torch here: recipe validation uses it.
"""
from __future__ import annotations

import re
from typing import Optional

OVERRIDABLE = ("bits", "group_size")
UNSUPPORTED_PREFIX = "-:"


def pattern(key: str) -> str:
    """The regular expression of a `dynamic` key (without its "+:" prefix)."""
    return key[2:] if key.startswith("+:") else key


def key_problem(key: str) -> Optional[str]:
    """Why `key` cannot be a `dynamic` key, or None."""
    if key.startswith(UNSUPPORTED_PREFIX):
        return (f"'{key}': '-:' keys (leave matching modules unquantized) are not supported; every linear of "
                "every decoder layer is quantized")
    try:
        re.compile(pattern(key))
    except re.error as exc:
        return f"'{key}' is not a regular expression: {exc}"
    return None


def matching_key(dynamic: Optional[dict], module: str) -> Optional[str]:
    """The first key of `dynamic` whose pattern matches `module` from its start, or None."""
    for key in dynamic or {}:
        if re.match(pattern(key), module):
            return key
    return None


def override(dynamic: Optional[dict], module: str) -> dict:
    """The overrides (`bits`, `group_size`) that apply to `module`; {} where none does."""
    key = matching_key(dynamic, module)
    return {} if key is None else {k: v for k, v in dict(dynamic[key]).items() if k in OVERRIDABLE and v is not None}


def as_config(dynamic: dict) -> dict:
    """The mapping as a checkpoint's quantization_config carries it: only the values set."""
    return {key: {k: v for k, v in dict(values).items() if v is not None} for key, values in dynamic.items()}


def module_entry(entry, module: str):
    """`entry` (a recipe quantize entry) with the overrides that apply to `module`: what the
    quantizer, the packing and the restore of that one linear read."""
    values = override(entry.dynamic, module)
    return entry.model_copy(update=values) if values else entry
