"""Compile-only: every launch configuration the wrappers can choose compiles for sm_80 and sm_90
within their shared memory, with fp16/bf16 operands on the tensor cores and no TF32 anywhere
(docs/kernels.md#compile-only-checks), with no GPU. This is the only check the bf16 paths get
on a CPU: the interpreter's bf16 arithmetic and its float32 -> bf16 rounding are wrong.

The compiles run in a fresh process (the interpreter must be off), spread over a few worker
processes; Triton's cache makes a rerun take seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("triton")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, A100 / H100

SCRIPT = r"""
import json, os, re, sys
from concurrent.futures import ProcessPoolExecutor

def compile_one(job):
    cc, i = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qlora_kernels.triton_kernels import launch_configs
    c = list(launch_configs())[i]
    k = triton.compile(ASTSource(c.kernel, c.signature, c.constexprs, c.attrs), target=GPUTarget("cuda", cc, 32),
                       options=c.options)
    ptx = k.asm["ptx"]
    mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx)))
    act = (c.signature.get("x_ptr") or c.signature.get("a_ptr") or "").lstrip("*")  # matmuls only
    # the first program id (M tiles, NF4 blocks) is widened to int64 before any multiply
    pid64 = re.search(r"(%\w+) = tt.get_program_id x : i32[^\n]*\n[^\n]*arith.extsi \1 : i32 to i64", k.asm["ttir"])
    return [cc, c.name, k.metadata.shared, "tf32" in ptx, mma, act, pid64 is not None]

if __name__ == "__main__":
    from qlora_kernels.triton_kernels import launch_configs
    n = len(list(launch_configs()))
    jobs = [(cc, i) for cc in (80, 90) for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        print(json.dumps(list(pool.map(compile_one, jobs, chunksize=8))))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_launch_configuration_compiles_for_sm80_and_sm90(compiled):
    from qlora_kernels.triton_kernels import launch_configs

    assert len(compiled) == 2 * len(list(launch_configs()))
    for cc, name, shared, *_ in compiled:
        assert shared <= SHARED_LIMIT[cc], f"sm_{cc} {name}: {shared} B of shared memory"


def test_row_offsets_are_int64(compiled):
    """M*K, M*N and the NF4 flat index may pass 2^31: the kernels that tile M (or NF4 blocks)
    widen their first program id to int64 before it meets a stride."""
    for cc, name, *_, pid64 in compiled:
        if name.startswith(("w4a16 ", "nf4_matmul", "nf4_dequantize")):
            assert pid64, f"sm_{cc} {name}: program id 0 used as int32"


def test_no_tf32_and_half_precision_operands_on_the_tensor_cores(compiled):
    """fp16/bf16 activations: every mma takes fp16/bf16 operands and accumulates in float32;
    float32 activations: no tensor-core instruction at all ("ieee" dots), hence no TF32. The
    GEMVs reduce in float32 registers: no tensor-core instruction at any dtype."""
    for cc, name, _, tf32, mma, act, _ in compiled:
        assert not tf32, f"sm_{cc} {name}: TF32 in the PTX"
        if "_gemv " in name or act == "fp32":
            assert not mma, f"sm_{cc} {name}: {mma}"
        elif act in ("fp16", "bf16"):
            assert mma, f"sm_{cc} {name}: no mma"
            ptx_type = {"fp16": "f16", "bf16": "bf16"}[act]
            for inst in mma:
                assert f".f32.{ptx_type}.{ptx_type}" in inst, f"sm_{cc} {name}: {inst}"


def test_the_wrappers_choose_only_compiled_tiles():
    """The tiles `w4a16_matmul` and the NF4 wrappers pick, over M and every group and block
    size a recipe or checkpoint can bring, are among the compiled ones."""
    from qlora_kernels import triton_kernels as tk
    from qlora_quant.nf4 import ALLOWED_BLOCKSIZES

    configs = list(tk.launch_configs())
    w4 = {(c.constexprs["BM"], c.constexprs["BN"], c.constexprs["BK"], c.constexprs["GROUP"] % c.constexprs["BK"] == 0)
          for c in configs if c.name.startswith("w4a16 ")}
    nf4 = {(c.constexprs["FORWARD"], c.constexprs["BM"], c.constexprs["BP"], c.constexprs["BR"])
           for c in configs if c.name.startswith("nf4_matmul")}
    for m in (1, 2, 16, 17, 64, 1023):
        for group in (8, 16, 24, 32, 40, 48, 56, 64, 72, 96, 112, 128, 192, 256, 1024, 4096, 11008, 14336):
            cfg = tk._w4a16_config(m, group)
            assert (cfg.BM, cfg.BN, cfg.BK, group % cfg.BK == 0) in w4, (m, group, cfg)
        for blocksize in ALLOWED_BLOCKSIZES:
            for forward in (True, False):
                cfg = tk._nf4_config(m, blocksize, forward)
                assert (forward, cfg.BM, cfg.BP, cfg.BR) in nf4, (m, blocksize, forward, cfg)


def test_the_gemv_wrappers_choose_only_compiled_tiles():
    """The GEMV tiles (and group path: one scale row per tile, or each row's group) that
    `w4a16_matmul` and `nf4_matmul` pick for every M <= GEMV_MAX_M and every group or block
    size are among the compiled ones, for both layouts; act-order and every activation/scale
    dtype pair are compiled at each row count."""
    from qlora_kernels import triton_kernels as tk
    from qlora_quant.nf4 import ALLOWED_BLOCKSIZES

    configs = [c for c in tk.launch_configs() if "_gemv " in c.name]
    tiles = lambda c: (c.constexprs["BM"], c.constexprs["BN"], c.constexprs["BK"])  # noqa: E731
    w4 = {(c.constexprs["AWQ"],) + tiles(c) + (c.constexprs["GROUP"] % c.constexprs["BK"] == 0,)
          for c in configs if c.name.startswith("w4a16_gemv ")}
    nf4 = {tiles(c) + (c.constexprs["ALIGNED"],) for c in configs if c.name.startswith("nf4_gemv ")}
    for m in range(1, tk.GEMV_MAX_M + 1):
        for group in (8, 16, 24, 32, 40, 48, 56, 64, 72, 96, 112, 128, 192, 256, 1024, 4096, 11008, 14336):
            for awq in (False, True):
                cfg = tk._w4a16_gemv_config(m, group, awq)
                assert (awq, cfg.BM, cfg.BN, cfg.BK, group % cfg.BK == 0) in w4, (m, group, awq, cfg)
        for blocksize in ALLOWED_BLOCKSIZES:
            cfg = tk._nf4_gemv_config(m, blocksize)
            for aligned in (True, False):
                assert (cfg.BM, cfg.BN, cfg.BK, aligned) in nf4, (m, blocksize, aligned, cfg)
    for bm in {tk._gemv_bm(m) for m in range(1, tk.GEMV_MAX_M + 1)}:
        for act, sc in tk.COMPILED_DTYPES:
            names = [c.name for c in configs if c.constexprs["BM"] == bm]
            assert any(f"gptq act-order {act} x {sc} scales" in n for n in names), (bm, act, sc)
            assert any(f"awq {act} x {sc} scales" in n for n in names), (bm, act, sc)
