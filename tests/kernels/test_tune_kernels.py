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

    before = (tk._w4a16_config, tk._split_k, tk._nf4_dequantize_rows, tk.NF4_DEQUANTIZE_WARPS)
    lines = []
    cases = list(tune.tune_w4a16(bench, tk, reference, [("o", 256, 128)], (1,), 1, lines.append))
    nf4 = list(tune.tune_nf4_dequantize(bench, tk, reference, [("o", 256, 128)], 1, lines.append))
    assert (tk._w4a16_config, tk._split_k, tk._nf4_dequantize_rows, tk.NF4_DEQUANTIZE_WARPS) == before
    assert [c["layout"] for c in cases] == ["gptq", "awq"]
    for c in cases:
        assert len(c["candidates"]) == 2 + 2  # every tile, then the best two at each of WAVES
        assert all(x["rel_error"] is not None and x["rel_error"] < 1e-2 for x in c["candidates"]), c["candidates"]
    assert nf4[0]["candidates"] == [{"rows": 8, "num_warps": 2, "us": 12.0, "exact": True}]
    assert len(lines) == 3
