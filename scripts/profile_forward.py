"""Where one forward of the default model's decoder body spends its time, by operator.

The evaluations and the quantizers' calibration passes are forwards of the decoder body; this
asks whether one operator dominates (something a kernel could fix) or the time is spread. It
loads the built-in SmolLM2-135M in the evaluation's dtype, runs the body over a batch of random
token windows once to warm up, times `--repeats` more (the fastest kept), then profiles one with
`torch.profiler` and groups the operators' own CPU time: matmuls, attention, elementwise and
normalisation, copies, the rest. It also gives the matmuls' rate (2 x tokens x the body's linear
parameters over their time). Stop other work first: two jobs on two cores stall each other.

    python scripts/profile_forward.py [--dtype bfloat16] [--batch 4] [--length 512] [--repeats 3]
        [--out benchmarks/forward_profile.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# aten operator -> the group the table reports it under
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_softmax"),
    "elementwise (norm, rotary, SwiGLU)": ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt",
                                           "aten::mean", "aten::neg", "aten::div_", "aten::sum", "aten::cat"),
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "forward_profile.json")
    args = parser.parse_args()

    from torch.profiler import profile

    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig

    source = resolve_model(ModelConfig.model_validate({"source": "builtin:smollm2-135m"}))
    model = load_hf_model(source, getattr(torch, args.dtype), "cpu")
    body = model.get_decoder()
    windows = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    linear_params = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        body(input_ids=windows, use_cache=False)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            body(input_ids=windows, use_cache=False)
            best = min(best, time.perf_counter() - t0)
        with profile() as prof:
            body(input_ids=windows, use_cache=False)
    own = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(own.values())
    groups = {g: sum(own.get(op, 0.0) for op in ops) for g, ops in GROUPS.items()}
    groups["other"] = total - sum(groups.values())
    matmul_gflops = 2 * args.batch * args.length * linear_params / groups["matmul"] / 1e9
    top = sorted(own.items(), key=lambda kv: -kv[1])[:8]

    print(f"SmolLM2-135M decoder body, {args.batch} x {args.length} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads: fastest of {args.repeats} forwards {best:.3f} s")
    print(f"{'group':<38} {'seconds':>8} {'share':>6}")
    for g, sec in groups.items():
        print(f"{g:<38} {sec:8.3f} {100 * sec / total:5.1f}%")
    print(f"matmuls: {matmul_gflops:.0f} GFLOP/s")
    record = {"benchmark": "profile_forward", "model": "SmolLM2-135M", "dtype": args.dtype,
              "batch": args.batch, "length": args.length, "threads": torch.get_num_threads(),
              "fastest_forward_seconds": round(best, 4), "profiled_seconds": round(total, 4),
              "groups_seconds": {g: round(s, 4) for g, s in groups.items()},
              "matmul_gflops": round(matmul_gflops, 1), "top_operators_seconds": {k: round(v, 4) for k, v in top},
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
              "torch": torch.__version__, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
