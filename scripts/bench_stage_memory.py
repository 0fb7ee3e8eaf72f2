"""Peak resident memory of the streaming stages (`merge`, `quantize-gptq`, `quantize-awq`) against model depth.

Builds synthetic Llama models that differ only in their number of decoder layers (each
layer several times smaller than the model), gives each a random LoRA adapter, runs the
stages one by one in fresh processes, and records the peak RSS of each measured stage's
process. Streaming stages keep the peak flat while the model grows.

    python scripts/bench_stage_memory.py [--layers 2 4 8 16] [--hidden 1024] [--out benchmarks/stage_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

# Runs a command as a child and prints the child's peak RSS (KiB), so each stage is measured alone.
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def build_model(path: Path, layers: int, hidden: int, intermediate: int, tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return sum(p.numel() * 2 for p in model.model.layers[0].parameters())


def build_adapter(model_dir: Path, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.conftest import random_adapter  # the tests' random LoRA adapter, at r 16

    random_adapter(model_dir, out, r=16, alpha=32, std=0.01)


def peak_rss_mib(args: list[str], cwd: Path) -> float:
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "qlora_pipeline.cli", *args],
                          cwd=cwd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"pipeline {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "stage_memory.json")
    args = parser.parse_args()

    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig

    tokenizer_dir = resolve_model(ModelConfig())
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n in args.layers:
            model_dir, adapter_dir = tmp / f"model-{n}", tmp / f"adapter-{n}"
            layer_bytes = build_model(model_dir, n, args.hidden, args.intermediate, tokenizer_dir)
            build_adapter(model_dir, adapter_dir)
            model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
            recipe = tmp / f"r{n}.yaml"
            recipe.write_text(yaml.safe_dump({
                "model": {"source": str(model_dir)},
                "data": {"seq_len": 128, "general": None},
                "merge": {"adapter": str(adapter_dir)},
                "calibration": {"samples": 16, "seq_len": 256},
                "quantize": [{"name": "gptq", "method": "gptq", "group_size": 64, "desc_act": True},
                             {"name": "awq", "method": "awq", "group_size": 64}],
                "tracking": {"enabled": False},
                "run": {"name": f"depth-{n}", "dir": str(tmp / "runs")},
            }))
            peak_rss_mib(["run", str(recipe), "--only", "data"], tmp)
            peak_rss_mib(["run", str(recipe), "--only", "base"], tmp)
            row = {"layers": n, "model_mib": model_bytes / 2**20, "layer_mib": layer_bytes / 2**20}
            for stage in ("merge", "calibrate", "quantize-gptq", "quantize-awq"):
                t0 = time.time()
                peak = peak_rss_mib(["run", str(recipe), "--only", stage], tmp)
                if stage != "calibrate":
                    row[f"{stage}_peak_rss_mib"], row[f"{stage}_seconds"] = peak, time.time() - t0
            rows.append(row)

    first = rows[0]
    print(f"{'layers':>6} {'model MiB':>10} {'layer MiB':>10} {'model x':>8} | {'merge peak MiB':>14} {'x':>5} | "
          f"{'gptq peak MiB':>13} {'x':>5} | {'awq peak MiB':>12} {'x':>5}")
    for r in rows:
        r["model_growth"] = r["model_mib"] / first["model_mib"]
        for stage in ("merge", "quantize-gptq", "quantize-awq"):
            r[f"{stage}_peak_growth"] = r[f"{stage}_peak_rss_mib"] / first[f"{stage}_peak_rss_mib"]
        print(f"{r['layers']:>6} {r['model_mib']:>10.1f} {r['layer_mib']:>10.1f} {r['model_growth']:>8.2f} | "
              f"{r['merge_peak_rss_mib']:>14.1f} {r['merge_peak_growth']:>5.2f} | "
              f"{r['quantize-gptq_peak_rss_mib']:>13.1f} {r['quantize-gptq_peak_growth']:>5.2f} | "
              f"{r['quantize-awq_peak_rss_mib']:>12.1f} {r['quantize-awq_peak_growth']:>5.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "stage_peak_rss", "machine": platform.machine(),
                                    "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
