"""scripts/compare_on_valid.py on tiny models: it scores the data stage's validation windows (not
the test split), its perplexities are the evaluation's own, and its pairs are the report's
paired intervals."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from qlora_pipeline.compute import resolve_dtype
from qlora_pipeline.layerwise.checkpoints import load_hf_model
from qlora_pipeline.paired import paired_change
from qlora_pipeline.scoring import perplexity_of, window_nlls
from tests.conftest import REPO, make_tiny_llama


def test_scores_the_validation_windows_and_pairs_them(tmp_path, smollm2_dir):
    run = tmp_path / "run"
    (run / "data" / "output").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"config": {"data": {"seq_len": 32}}}))
    g = torch.Generator().manual_seed(0)
    streams = {"domain_valid": torch.randint(0, 1000, (5 * 32 + 7,), generator=g),  # 5 whole windows
               "domain_eval": torch.randint(0, 1000, (3 * 32,), generator=g)}
    save_file(streams, str(run / "data" / "output" / "tokens.safetensors"))
    small = make_tiny_llama(tmp_path / "small", smollm2_dir, layers=1)
    deeper = make_tiny_llama(tmp_path / "deeper", smollm2_dir, layers=2)
    out = tmp_path / "valid.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_on_valid.py"), str(run), str(small),
                           str(deeper), "--pair", "0", "1", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["windows"] == [5, 32]

    windows = streams["domain_valid"][: 5 * 32].view(5, 32)
    dtype = resolve_dtype("auto", "cpu")
    nlls = [window_nlls(load_hf_model(d, dtype, "cpu"), windows, 4, "cpu") for d in (small, deeper)]
    for row, expected in zip(result["rows"], nlls):
        assert row["window_nll"] == expected.tolist()
        assert row["valid_ppl"] == perplexity_of(expected, 32)
    expected_pair = paired_change(nlls[0].tolist(), nlls[1].tolist(), 32)
    (pair,) = result["pairs"]
    assert (pair["change_percent"], pair["low"], pair["high"]) == (expected_pair.percent, expected_pair.low,
                                                                   expected_pair.high)
    assert result["rows"][1]["change_percent"] == paired_change(nlls[1].tolist(), nlls[0].tolist(), 32).percent
    assert "0 against 1" in proc.stdout
