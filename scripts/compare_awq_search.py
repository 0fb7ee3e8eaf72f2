"""Where AWQ searches: inside each quantize stage, or once on the scaled float model.

Design "per-method" (before): each `awq`/`awq+gptq` stage searches layer by layer on the inputs
its own already-quantized layers produce, so two entries with the same AWQ settings search
twice and their searches differ. Design "float" (AWQ's reference, now the pipeline's): one
`awq-search` pass on the scaled full-precision model, whose result both entries apply.

Design "awq's search" (a third way to share): `awq+gptq` applies the search that the `awq`
entry made on its own quantized layers' inputs (design "per-method" of `awq`), so a recipe
with both entries searches once, where it searches twice with the other designs.

Runs the designs on a finished run directory's merged model and calibration windows
(float32 forwards, so only the design differs), evaluates every packed result on the
validation split (`domain_valid`, never the test split), and prints time and perplexity.
The run directory needs `data`, `merge` and `calibrate` done.

    python scripts/compare_awq_search.py RUN_DIR [--group-size 64] [--windows 16] [--out FILE]
"""
from __future__ import annotations

import argparse
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
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16, help="domain_valid windows of data.seq_len tokens")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "awq_search_design.json")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from qlora_pipeline.data import windows
    from qlora_pipeline.layerwise.awq_search import make_transform
    from qlora_pipeline.layerwise.checkpoints import load_hf_model, read_config
    from qlora_pipeline.layerwise.engine import transform_sequentially
    from qlora_pipeline.layerwise.families import family_for
    from qlora_pipeline.methods import METHODS
    from qlora_pipeline.methods.awq import settings
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.recipe import QuantizeEntry
    from qlora_pipeline.runinfo import read_run_recipe
    from qlora_pipeline.scoring import perplexity
    from qlora_pipeline.stages.calibrate import CALIBRATION_FILE
    from qlora_pipeline.stages.data import TOKENS_FILE

    merged = args.run_dir / "merge" / "output"
    calibration = load_file(str(args.run_dir / "calibrate" / "output" / CALIBRATION_FILE))["input_ids"]
    seq_len = read_run_recipe(args.run_dir).data.seq_len  # what the evaluation windows use
    valid = windows(load_file(str(args.run_dir / "data" / "output" / TOKENS_FILE))["domain_valid"], seq_len, args.windows)
    family = family_for(read_config(merged)["model_type"])
    quiet = lambda it, **kw: it  # noqa: E731
    entries = {
        "awq": QuantizeEntry(name="awq", method="awq", group_size=args.group_size, compute_dtype="float32"),
        "awq+gptq": QuantizeEntry(name="awq-gptq", method="awq+gptq", group_size=args.group_size, desc_act=True,
                                  static_groups=True, compute_dtype="float32"),
    }

    def valid_ppl(out: Path, method: str) -> float:
        model = METHODS[method].loader()(out, torch.float32, "cpu")
        return perplexity(model, valid, 4, "cpu", quiet, method)[0]

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = perplexity(load_hf_model(merged, torch.float32, "cpu"), valid, 4, "cpu", quiet, "merged")[0]
        search_dir = tmp / "search"
        search_dir.mkdir()
        t0 = time.time()
        transform_sequentially(merged, calibration, family,
                               make_transform(family, settings(entries["awq"]), search_dir, torch.bfloat16),
                               quiet, lambda i, m: None)
        search_seconds = time.time() - t0
        folder = {"per-method": "per-method", "float": "float", "awq's search": "awq-own-search"}

        def checkpoint_dir(design: str, method: str) -> Path:
            """Where a design's quantization keeps its per-layer files (and AWQ its search)."""
            return tmp / f"{folder[design]}-{entries[method].name}-ckpt"

        awq_own_search = checkpoint_dir("per-method", "awq")  # the per-method AWQ's own search files
        designs = [("per-method", "awq"), ("per-method", "awq+gptq"), ("float", "awq"), ("float", "awq+gptq"),
                   ("awq's search", "awq+gptq")]
        for design, method in designs:
            entry = entries[method]
            ckpt, out = checkpoint_dir(design, method), tmp / f"{folder[design]}-{entry.name}"
            ckpt.mkdir()
            out.mkdir()
            t0 = time.time()
            quantize_checkpoint(merged, calibration, entry, torch.bfloat16, ckpt, out, quiet, lambda i, m: None,
                                search_dir={"float": search_dir, "awq's search": awq_own_search}.get(design))
            seconds = time.time() - t0
            ppl = valid_ppl(out, method)
            rows.append({"design": design, "method": method, "valid_ppl": ppl,
                         "increase_over_merged_percent": 100 * (ppl / base - 1), "stage_seconds": seconds})
    print(f"merged model: domain_valid ppl {base:.3f} ({args.windows} windows of {seq_len}); shared float search "
          f"{search_seconds:.0f} s")
    print(f"{'design':<13} {'method':<9} {'valid ppl':>9} {'vs merged':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r['design']:<13} {r['method']:<9} {r['valid_ppl']:>9.3f} {r['increase_over_merged_percent']:>+9.2f}% "
              f"{r['stage_seconds']:>8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "awq_search_design", "run_dir": str(args.run_dir), "group_size": args.group_size,
        "valid_windows": args.windows, "seq_len": seq_len, "merged_valid_ppl": base,
        "float_search_seconds": search_seconds, "rows": rows, "cpus": os.cpu_count(),
        "machine": platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
