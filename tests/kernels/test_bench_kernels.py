"""scripts/bench_kernels.py without a GPU: `--help` documents the protocol, `--dry-run` lists
every row with its docs/kernels.md target, and the measuring code runs end to end on a tiny
shape through the interpreter (fp16 on the CPU; timings faked, since nothing can be timed here)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "bench_kernels.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def _module():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_documents_the_protocol():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for needle in ("--dry-run", "2x the L2", "CUDA graphs", "{1, 4, 16, 128, 1024, 4096}", "Llama-3-70B", "twin",
                   "bitsandbytes", "dequantize + cuBLAS", "act-order", "benchmarks/kernels_<device>.json",
                   "pass/fail"):
        assert needle in proc.stdout, needle


def test_dry_run_lists_the_rows_with_their_targets():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("dry run:")
    rows = [l.split() for l in lines[2:]]
    assert {r[0] for r in rows} == {"llama3-8b", "llama3-70b"}
    assert {r[4] for r in rows} == {"-", "1", "4", "16", "128", "1024", "4096"}
    text = proc.stdout
    # one line per target kind of docs/kernels.md#speed-targets
    assert "llama3-8b  gate_up  4096 28672    1 w4a16 gptq           bf16 F.linear                  3.00x" in text
    assert "llama3-8b  o        4096  4096    1 w4a16 awq            bf16 F.linear                  1.70x" in text
    assert "llama3-70b down    28672  8192    - nf4_dequantize       copy bandwidth                  0.85" in text
    assert "llama3-8b  down    14336  4096   16 w4a16 gptq           bf16 F.linear                  2.60x" in text
    assert "llama3-70b o        8192  8192 4096 nf4 linear fwd+bwd   bf16 linear fwd+bwd            0.90x" in text
    assert "llama3-8b  qkv      4096  6144    1 w4a16 gptq act-order w4a16 gptq                     0.95x" in text
    assert "llama3-8b  qkv      4096  6144 1024 w4a16 awq            bf16 F.linear                  0.95x" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in; on a GPU run the script itself")
def test_without_a_gpu_the_measurement_refuses():
    proc = _run("--quick")
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in; on a GPU run the script itself")
def test_measuring_code_runs_end_to_end_on_a_tiny_shape(monkeypatch, capsys):
    bench = _module()
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "DTYPE", torch.float16)  # bf16 is wrong in the interpreter
    monkeypatch.setattr(bench, "SHAPES", {"llama3-8b": [("o", 256, 128)]})
    monkeypatch.setattr(bench, "_bitsandbytes", lambda: (None, None))
    monkeypatch.setattr(bench, "_l2_bytes", lambda: 1024)  # two copies of each weight
    monkeypatch.setattr(bench, "copy_bandwidth", lambda reps: 1e12)
    timed = []

    def fake_time(calls, reps):
        for c in calls:
            c()
        timed.append(len(calls))
        return {"us": 10.0, "us_eager": 20.0}

    monkeypatch.setattr(bench, "time_calls", fake_time)
    monkeypatch.setenv("QLP_KERNELS", "triton")
    from qlora_kernels import triton_kernels as tk

    gemv_calls = []
    for name in ("_w4a16_gemv", "_nf4_gemv"):
        original = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _n=name, _o=original: gemv_calls.append(_n) or _o(*a))
    rows = bench.plan(["llama3-8b"], (1, 20), bnb=False)
    measured = bench.measure(rows, reps=1)
    bench.evaluate(rows, measured)
    assert min(timed) == 2  # weights rotate over (at least) two copies
    # at M = 1 the GEMV is what runs (and is checked); the split-K kernel it replaced is timed too
    assert {"_w4a16_gemv", "_nf4_gemv"} <= set(gemv_calls) and tk.GEMV_MAX_M == bench.GEMV_MAX_M
    for r in rows:
        if r["M"] == 1 and r["kernel"].startswith(("w4a16", "nf4 linear fwd")):
            assert r["path"].startswith("GEMV") and r["check_rel_error"] is not None, r
    off = [r for r in rows if r["baseline"] == bench.GEMV_OFF]
    assert {r["kernel"] for r in off} == {"w4a16 gptq", "w4a16 awq", "w4a16 gptq act-order", "nf4 linear fwd"}
    assert all(r["M"] == 1 and r["value"] == 1.0 for r in off)
    assert all(measured["times"][("llama3-8b", "o", 1, f"{r['kernel']} {bench.GEMV_OFF}")]["check_rel_error"] < 1e-2
               for r in off)
    for r in rows:
        assert r["check_rel_error"] is None or r["check_rel_error"] < 1e-2, r
        if r["target"] is not None:
            assert r["pass"] == (r["value"] >= r["target"])
    bench.print_table(rows, measured=True)
    out = capsys.readouterr().out
    assert "PASS" in out or "FAIL" in out
