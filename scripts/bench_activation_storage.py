"""What storing the layer engine's calibration activations in bfloat16 costs: GPTQ on a finished
run's merged model and calibration windows, once with float32 activation storage and once with
bfloat16 (`activations.dtype`; the forwards compute in float32 either way), each result's
perplexity on the validation split (`domain_valid`, never the test split).

    python scripts/bench_activation_storage.py RUN_DIR [--entry gptq-w4g64] [--windows N] [--out FILE]

RUN_DIR: a run of recipes/smollm2_domain.yaml with its merge and calibrate stages done; the
entry's settings come from the run's recipe (run.json). Runs on the CPU (the machine this
was measured on has no GPU). Also says whether the float32 result equals, byte for byte, the
run's own quantize stage output (it should where that run was made with the same code path).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--entry", default="gptq-w4g64", help="a quantize entry of the run's recipe")
    parser.add_argument("--windows", type=int, default=None, help="domain_valid windows (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "activation_storage.json")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from qlora_pipeline.data import windows
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.methods import METHODS
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.recipe import QuantizeEntry
    from qlora_pipeline.scoring import perplexity
    from qlora_pipeline.stages.calibrate import CALIBRATION_FILE
    from qlora_pipeline.stages.data import TOKENS_FILE

    recipe = json.loads((args.run_dir / "run.json").read_text())["recipe"]
    raw = next(q for q in recipe["quantize"] if q["name"] == args.entry)
    known = set(QuantizeEntry.model_fields) - {"device", "activations"}
    base_entry = {k: v for k, v in raw.items() if k in known}
    merged = args.run_dir / "merge" / "output"
    calibration = load_file(str(args.run_dir / "calibrate" / "output" / CALIBRATION_FILE))["input_ids"]
    seq_len = recipe["data"]["seq_len"]
    valid = windows(load_file(str(args.run_dir / "data" / "output" / TOKENS_FILE))["domain_valid"], seq_len,
                    args.windows)
    quiet = lambda it, **kw: it  # noqa: E731
    torch.set_grad_enabled(False)
    base = perplexity(load_hf_model(merged, torch.float32, "cpu"), valid, 4, "cpu", quiet, "merged")[0]
    published = args.run_dir / f"quantize-{args.entry}" / "manifest.json"
    published_hashes = ({k: v["sha256"] for k, v in json.loads(published.read_text())["files"].items()
                         if k.endswith(".safetensors")} if published.exists() else None)

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for dtype in ("float32", "bfloat16"):
            entry = QuantizeEntry(**{**base_entry, "device": "cpu", "activations": {"dtype": dtype}})
            ckpt, out = Path(tmp_name) / f"{dtype}-ckpt", Path(tmp_name) / dtype
            ckpt.mkdir()
            out.mkdir()
            t0 = time.time()
            quantize_checkpoint(merged, calibration, entry, torch.bfloat16, ckpt, out, quiet, lambda i, m: None)
            seconds = time.time() - t0
            model = METHODS[entry.method].loader()(out, torch.float32, "cpu")
            ppl = perplexity(model, valid, 4, "cpu", quiet, dtype)[0]
            hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.safetensors")}
            rows.append({"activations_dtype": dtype, "valid_ppl": ppl, "increase_over_merged_percent": 100 * (ppl / base - 1),
                         "quantize_seconds": seconds,
                         "equals_the_runs_output": None if published_hashes is None else hashes == published_hashes})
    fp32, bf16 = rows
    change = 100 * (bf16["valid_ppl"] / fp32["valid_ppl"] - 1)
    print(f"merged model: domain_valid ppl {base:.4f} ({len(valid)} windows of {seq_len})")
    for r in rows:
        print(f"{args.entry} activations {r['activations_dtype']:<8}: ppl {r['valid_ppl']:.4f} "
              f"({r['increase_over_merged_percent']:+.2f}% over merged), {r['quantize_seconds']:.0f} s, "
              f"equals the run's output: {r['equals_the_runs_output']}")
    print(f"bf16 activation storage changes domain_valid perplexity by {change:+.3f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "activation_storage", "run_dir": str(args.run_dir), "entry": raw, "device": "cpu",
        "calibration": list(calibration.shape), "valid_windows": len(valid), "seq_len": seq_len,
        "merged_valid_ppl": base, "rows": rows, "bf16_ppl_change_percent": change,
        "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
