"""Per-layer safetensors shards: written atomically as intra-stage checkpoints, each sealed with
its sha256 beside it (`<shard>.sha256`) and checked against it on resume, and assembled into a
sharded HF checkpoint with its index."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_pipeline.rundir import fsync_dir

SHARD = "layer-{:05d}.safetensors"
REST_SHARD = "rest.safetensors"


SEAL_SUFFIX = ".sha256"


def _seal_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SEAL_SUFFIX)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def valid_shard(path, sealed: bool = True) -> bool:
    """Whether a shard can be used as it is: a safetensors file with tensors and, when
    `sealed` (a stage's own checkpoint, written by `save_atomic`), the sha256 its seal records.
    A byte flipped with the mtime put back left a checkpoint that parsed, and a resumed stage
    computed every later layer from it. `sealed=False` for a shard in a stage's published
    output, which its manifest covers."""
    try:
        with safe_open(path, "pt") as st:
            if not list(st.keys()):
                return False
    except Exception:
        return False  # truncated or damaged: recompute this layer
    if not sealed:
        return True
    try:
        return _seal_path(path).read_text(encoding="ascii").strip() == _sha256(path)
    except (OSError, UnicodeDecodeError):
        return False  # no seal (killed between the two renames) or unreadable: recompute


def save_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` through a temporary file and a rename. `metadata` holds at most
    one key (default {"format": "pt"}): safetensors writes its metadata map in hash order, which
    changes from process to process, so two keys give different bytes for the same content,
    and byte-identical outputs are how resumed and reused stages are checked."""
    if metadata is not None and len(metadata) > 1:
        raise ValueError(f"one metadata key at most (bytes must not depend on hash order), got {sorted(metadata)}")
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    # The seal first: a shard in place always has the seal of its bytes beside it (a kill
    # between the renames leaves the old shard, or none, with a seal it fails: recomputed).
    seal, seal_tmp = _seal_path(path), _seal_path(tmp)
    seal_tmp.write_text(_sha256(tmp), encoding="ascii")
    os.replace(seal_tmp, seal)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def assemble_shards(checkpoint_dir, output_dir, n_layers: int, transform=None) -> int:
    """Move the per-layer shards (and the rest) into `output_dir` under HF shard names, write the
    index, and return the total size in bytes. With `transform(tensors) -> tensors`, shards are
    rewritten into the output instead (the checkpoints stay as they were until the stage ends)."""
    shards = [checkpoint_dir / SHARD.format(i) for i in range(n_layers)] + [checkpoint_dir / REST_SHARD]
    weight_index: dict[str, str] = {}
    total_size = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with safe_open(shard, "pt") as st:
            for name in st.keys():
                weight_index[name] = fname
        if transform is None:
            os.replace(shard, output_dir / fname)
        else:
            from safetensors.torch import load_file

            save_file(transform(load_file(str(shard))), str(output_dir / fname), metadata={"format": "pt"})
        total_size += (output_dir / fname).stat().st_size
    (output_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_index.items()))}, indent=2)
    )
    return total_size


def release_freed_memory() -> None:
    """Hand memory freed by the finished layer back to the OS. glibc keeps freed blocks of
    the many mid-sized tensors of a layer in its arenas; without a trim the resident size
    creeps up layer after layer although nothing is alive."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
