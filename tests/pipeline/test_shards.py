"""Per-layer shards: written whole (temporary file + rename), and byte-identical for the same
content in any process (resumed and reused stages are checked by their bytes)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qlora_pipeline.layerwise.shards import save_atomic

WRITE = """
import sys, torch
from pathlib import Path
from qlora_pipeline.layerwise.shards import save_atomic
save_atomic({"b": torch.arange(6.0), "a": torch.ones(2, 3)}, Path(sys.argv[1]), metadata={"metrics": '{"loss": 0.5}'})
"""


def test_the_same_shard_has_the_same_bytes_in_fresh_processes(tmp_path):
    # safetensors orders its metadata map by a per-process hash seed: with two keys the bytes
    # changed from one process to the next (seen as an AWQ search that "differed" after a resume)
    paths = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for p in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(p)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_more_than_one_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="one metadata key"):
        save_atomic({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"format": "pt", "metrics": "{}"})


def test_a_shard_is_valid_only_with_the_seal_of_its_bytes(tmp_path):
    from qlora_pipeline.layerwise.shards import valid_shard

    path = tmp_path / "layer-00000.safetensors"
    save_atomic({"w": torch.arange(64.0)}, path)
    assert valid_shard(path) and (tmp_path / "layer-00000.safetensors.sha256").is_file()
    assert not list(tmp_path.glob("*.tmp*"))
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0x01  # in a tensor's bytes: the header still parses
    path.write_bytes(bytes(raw))
    assert not valid_shard(path) and valid_shard(path, sealed=False)
    save_atomic({"w": torch.arange(64.0)}, path)
    assert valid_shard(path)
    (tmp_path / "layer-00000.safetensors.sha256").unlink()
    assert not valid_shard(path)
