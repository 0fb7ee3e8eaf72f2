"""The header of a safetensors file, read without its tensors: preflight checks files against
it, the memory plan sizes checkpoints from it.

Format: 8 bytes of little-endian header length, then that many bytes of a JSON object mapping
each tensor's name to {dtype, shape, data_offsets: [begin, end]} (offsets into the data after
the header), plus an optional "__metadata__" entry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


class HeaderError(ValueError):
    """What is wrong with a file as a safetensors file, in words that finish "<file> ..."."""


class Header(NamedTuple):
    tensors: dict  # name -> {dtype, shape, data_offsets}; "__metadata__" left out
    header_bytes: int  # the JSON header's length (the data starts 8 bytes after it)
    data_end: int  # the largest data_offsets end: the bytes of data the tensors need

    @property
    def tensor_bytes(self) -> int:
        return sum(end - begin for begin, end in (t["data_offsets"] for t in self.tensors.values()))


def read_header(path: Path) -> Header:
    """The header of `path`, checked for shape (not against the file's length).

    Raises:
        OSError: the file cannot be read.
        HeaderError: not a safetensors header (no valid length, not a JSON table, cut short,
            a tensor without its data_offsets).
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise HeaderError("is not a safetensors file (no valid header length)")
        raw = fh.read(length)
    if len(raw) < length:
        raise HeaderError(f"is truncated ({path.stat().st_size} bytes, less than its own header)")
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        table = None
    if not isinstance(table, dict):
        raise HeaderError("is not a safetensors file (its header is not a JSON table)")
    tensors = {name: meta for name, meta in table.items() if name != "__metadata__"}
    try:
        ranges = [(int(t["data_offsets"][0]), int(t["data_offsets"][1])) for t in tensors.values()]
    except (TypeError, KeyError, IndexError, ValueError):
        raise HeaderError("has a damaged safetensors header (a tensor without its data_offsets)") from None
    return Header(tensors, length, max((end for _, end in ranges), default=0))
