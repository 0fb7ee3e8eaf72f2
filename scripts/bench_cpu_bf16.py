"""Is bf16 faster than float32 on this CPU? The question behind `dtype: auto` on the CPU.

Measures, in one process, a matmul of the default model's MLP shape ([2048x576]x[576x1536],
medians, the two dtypes taking turns five times) and one forward of SmolLM2-135M over 4
windows of 512 tokens, in float32 and in bf16 (weights and activations), with the threads torch
uses here. Prints a table and writes benchmarks/cpu_bf16.json. The end-to-end figures (two full runs of the default
recipe, train/evaluate/quantize per stage) are in the README's "CPU bf16" paragraph.

    python scripts/bench_cpu_bf16.py [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "cpu_bf16.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig

    model_dir = resolve_model(ModelConfig(source="builtin:smollm2-135m"))
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    ids = torch.randint(0, 40000, (4, 512), generator=torch.Generator().manual_seed(0))
    dtypes = (torch.float32, torch.bfloat16)
    operands = {dt: (a.to(dt), b.to(dt)) for dt in dtypes}
    models = {dt: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval() for dt in dtypes}
    mm: dict = {dt: [] for dt in dtypes}
    fwd: dict = {dt: [] for dt in dtypes}
    with torch.no_grad():
        for _ in range(5):  # the dtypes take turns, so a busy moment of the machine hits both
            for dt in dtypes:
                A, B = operands[dt]
                mm[dt].append(_median_seconds(lambda: A @ B, 10))
                fwd[dt].append(_median_seconds(lambda: models[dt](ids), 1))
    rows = [{"dtype": str(dt).replace("torch.", ""),
             "matmul_gflops": 2 * 2048 * 576 * 1536 / statistics.median(mm[dt]) / 1e9,
             "forward_seconds": statistics.median(fwd[dt])} for dt in dtypes]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"{'dtype':<9} {'matmul GFLOP/s':>15} {'SmolLM2 4x512 forward s':>24}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['matmul_gflops']:>15.1f} {r['forward_seconds']:>24.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "cpu_bf16", "rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags},
        indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
