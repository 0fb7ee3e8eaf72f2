"""Compile-only: every launch configuration compiles for sm_80 and sm_90 within their shared
memory (KERNELS.md §4), with no GPU. Runs in a fresh process: the interpreter must be off."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("triton")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, A100 / H100

SCRIPT = """
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from kernels.triton_kernels import launch_configs
out = []
for cc in (80, 90):
    for dtype in ("fp16", "bf16"):
        for name, fn, sig, consts in launch_configs(dtype):
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32))
            out.append([cc, dtype, name, k.metadata.shared])
print(json.dumps(out))
"""


def test_every_launch_configuration_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * 2 * 15
    for cc, dtype, name, shared in results:
        assert shared <= SHARED_LIMIT[cc], f"sm_{cc} {dtype} {name}: {shared} B of shared memory"
