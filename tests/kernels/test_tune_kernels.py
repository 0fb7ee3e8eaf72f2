"""scripts/tune_kernels.py without a GPU: the sweep runs end to end on a tiny shape through the
interpreter (fp16 on the CPU, timings faked), every candidate's output is checked, and the
attributes it swaps are restored afterwards."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in; on a GPU run the script itself")
def test_sweep_runs_end_to_end_on_a_tiny_shape(monkeypatch):
    spec = importlib.util.spec_from_file_location("tune_kernels", REPO / "scripts" / "tune_kernels.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    bench = tune._bench()
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "DTYPE", torch.float16)  # bf16 is wrong in the interpreter
    monkeypatch.setattr(bench, "_l2_bytes", lambda: 1024)
    monkeypatch.setattr(bench, "time_calls", lambda calls, reps: [c() for c in calls] and {"us": 10.0 + len(calls)})
    monkeypatch.setattr(tune, "TILES", [dict(BN=64, BK=64, num_warps=4, num_stages=2),
                                        dict(BN=128, BK=128, num_warps=8, num_stages=4)])
    monkeypatch.setattr(tune, "WAVES", (1,))
    monkeypatch.setattr(tune, "NF4_ROWS", (8,))
    monkeypatch.setattr(tune, "NF4_WARPS", (2,))
    monkeypatch.setenv("QLP_KERNELS", "triton")
    from qlora_kernels import reference
    from qlora_kernels import triton_kernels as tk

    lines = []
    monkeypatch.setattr(tune, "GEMV_BN", (64,))
    monkeypatch.setattr(tune, "GEMV_BK", (32, 128))
    monkeypatch.setattr(tune, "GEMV_WARPS", (4,))
    before = (tk._w4a16_config, tk._split_k, tk._nf4_dequantize_rows, tk.NF4_DEQUANTIZE_WARPS, tk._w4a16_gemv_config,
              tk._nf4_gemv_config, tk.GEMV_MAX_M)
    gemv = list(tune.tune_gemv(bench, tk, reference, [("o", 256, 128)], (1, 3), 1, lines.append))
    assert [(c["kind"], c["M"]) for c in gemv] == [(k, m) for k in ("gptq", "awq", "nf4") for m in (1, 3)]
    for c in gemv:
        # every tile (not NF4's BK 128, above its block of 64; not AWQ's 128 at M = 3, too many
        # partial sums), then the best two at each of WAVES
        tiles = len(tune.gemv_candidates(c["kind"], c["M"], tk._gemv_bm(c["M"])))
        assert tiles == (1 if c["kind"] == "nf4" or (c["kind"], c["M"]) == ("awq", 3) else 2)
        assert len(c["candidates"]) == tiles + min(tiles, 2), c
        assert all(x["rel_error"] is not None and x["rel_error"] < 1e-2 for x in c["candidates"]), c["candidates"]
        assert c["split_k_us"] == 12.0 and c["current"]["config"]["BM"] == (1 if c["M"] == 1 else 4)
    lines.clear()
    cases = list(tune.tune_w4a16(bench, tk, reference, [("o", 256, 128)], (1,), 1, lines.append))
    nf4 = list(tune.tune_nf4_dequantize(bench, tk, reference, [("o", 256, 128)], 1, lines.append))
    assert (tk._w4a16_config, tk._split_k, tk._nf4_dequantize_rows, tk.NF4_DEQUANTIZE_WARPS, tk._w4a16_gemv_config,
            tk._nf4_gemv_config, tk.GEMV_MAX_M) == before
    assert [c["layout"] for c in cases] == ["gptq", "awq"]
    for c in cases:
        assert len(c["candidates"]) == 2 + 2  # every tile, then the best two at each of WAVES
        assert all(x["rel_error"] is not None and x["rel_error"] < 1e-2 for x in c["candidates"]), c["candidates"]
    assert nf4[0]["candidates"] == [{"rows": 8, "num_warps": 2, "us": 12.0, "exact": True}]
    assert len(lines) == 3


def test_dry_run_lists_the_sweeps_without_a_gpu():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "tune_kernels.py"), "--dry-run"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for needle in ("dry run", "nf4_dequantize", "split-K (GEMV off)", "gemv gptq M = 1", "gemv awq M = 16",
                   "gemv nf4 M = 4"):
        assert needle in proc.stdout, needle
