"""scripts/bench_awq_search.py on a tiny model: every part it reports is timed (the search still
calls the functions it wraps), the parts add up to the total, and the search it ran is the
search the stage runs (the same files, to the bit)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_pipeline.layerwise.awq_search import AWQSettings, make_transform
from qlora_pipeline.layerwise.engine import transform_sequentially
from qlora_pipeline.layerwise.families import LLAMA
from qlora_pipeline.stages.calibrate import CALIBRATION_FILE
from tests.conftest import make_tiny_llama

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_awq_search.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_awq_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_part_is_timed_and_the_search_is_the_stage_search(tmp_path, smollm2_dir):
    run = tmp_path / "run"
    model = make_tiny_llama(run / "merge" / "output", smollm2_dir, layers=2, hidden=128, intermediate=256)
    (run / "calibrate" / "output").mkdir(parents=True)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(run / "calibrate" / "output" / CALIBRATION_FILE))

    bench = _bench()
    (tmp_path / "bench").mkdir()
    row = bench.search_once(run, 2, 2, tmp_path / "bench")
    parts = [p for p, _ in bench.PARTS] + ["next-layer forward"]
    assert all(row[p] > 0 for p in parts), row
    assert abs(sum(row[p] for p in parts + ["other"]) - row["total_seconds"]) < 1e-6
    assert row["other"] >= 0

    (tmp_path / "stage").mkdir()
    transform = make_transform(LLAMA, AWQSettings(4, 64, True, True, 2), tmp_path / "stage", torch.bfloat16)
    transform_sequentially(model, ids, LLAMA, transform, lambda it, **kw: it, lambda i, m: None)
    written = sorted(p.name for p in (tmp_path / "bench").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "stage").iterdir())
    assert [n for n in written if n.endswith(".safetensors")] == ["awq-00000.safetensors", "awq-00001.safetensors"]
    for name in written:
        assert (tmp_path / "bench" / name).read_bytes() == (tmp_path / "stage" / name).read_bytes()
