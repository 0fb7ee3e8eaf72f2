"""Nested Python state (optimizer, scheduler, RNG) saved without pickle: tensors in
safetensors, everything else in JSON.

Loading a run directory must never execute code from it, so resume state is not written with
`torch.save` (a pickle). `save_state` walks dicts, lists and tuples; every tensor goes into
`<name>.safetensors` under its path, and the JSON structure refers to it by that key. JSON
can't tell an int dict key (an optimizer's parameter index) from a string, nor a tuple from a
list, so such containers are tagged. Only plain data loads back: a JSON document that is not
one of these shapes is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class UnsafeStateError(ValueError):
    """A state file that does not hold plain data in the expected shape."""


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().clone()  # own storage: safetensors refuses shared memory
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"state key {k!r} at {path or '/'} is not a plain value")
            items.append([k, _encode(v, f"{path}/{k}", tensors)])
        return {_ITEMS: items}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"state value of type {type(obj).__name__} at {path or '/'} is not plain data")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            key = obj[_TENSOR]
            if len(obj) != 1 or key not in tensors:
                raise UnsafeStateError(f"state refers to a tensor '{key}' that is not in the file")
            return tensors[key]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise UnsafeStateError(f"unexpected value in a state file: {type(obj).__name__}")


def save_state(obj: Any, directory: Path, name: str) -> None:
    """Write `obj` as `<name>.json` and `<name>.safetensors` in `directory`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, "", tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_state(directory: Path, name: str) -> Any:
    """The object `save_state` wrote; raises UnsafeStateError on anything else."""
    try:
        structure = json.loads((directory / f"{name}.json").read_text())
        tensors = load_file(str(directory / f"{name}.safetensors"))
    except (OSError, ValueError) as exc:
        raise UnsafeStateError(f"cannot read state {directory / name}: {exc}") from None
    return _decode(structure, tensors)
