"""Artifacts side by side on the validation split, for choosing a setting without the test split.

    python scripts/compare_on_valid.py RUN_DIR ARTIFACT_DIR [ARTIFACT_DIR ...]
        [--windows N] [--pair I J ...] [--out benchmarks/NAME.json]

Each ARTIFACT_DIR is a stage output that the evaluate stage can load: a `quantize-<name>`
stage's output (loaded as it ships, through its method's loader) or a plain HF checkpoint (a
`merge` output). All are scored on the device and in the dtype that the evaluation's `auto`
settings pick, 4 windows a batch as the default recipe evaluates, on the same `domain_valid`
windows of RUN_DIR's `data` stage (data.seq_len tokens each; never the test split), and every
artifact after the first is compared with the first: the change in perplexity with its 95%
interval from the window-by-window differences (`qlora_pipeline.paired`, as the report computes
it); `--pair I J` also compares artifact I with artifact J (0-based, in the order given).
Prints a table; `--out` also writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--windows", type=int, default=None, help="at most this many domain_valid windows")
    parser.add_argument("--pair", type=int, nargs=2, action="append", default=[], metavar=("I", "J"),
                        help="also compare artifact I against artifact J")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from safetensors.torch import load_file

    from qlora_pipeline.compute import resolve_dtype
    from qlora_pipeline.data import windows
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.methods import METHODS
    from qlora_pipeline.paired import paired_change
    from qlora_pipeline.scoring import perplexity_of, window_nlls
    from qlora_pipeline.stages.data import TOKENS_FILE
    from qlora_pipeline.stages.quantize import SUMMARY_FILE

    manifest = json.loads((args.run_dir / "data" / "manifest.json").read_text())
    seq_len = int(manifest["config"]["data"]["seq_len"])  # the windows the evaluate stage scores
    streams = load_file(str(args.run_dir / "data" / "output" / TOKENS_FILE))
    valid = windows(streams["domain_valid"], seq_len, args.windows)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as `evaluate.device: auto`
    dtype = resolve_dtype("auto", device)
    rows = []
    for artifact in args.artifacts:
        summary = artifact / SUMMARY_FILE
        if summary.is_file():
            model = METHODS[json.loads(summary.read_text())["method"]].loader()(artifact, dtype, device)
        else:
            model = load_hf_model(artifact, dtype, device)
        t0 = time.time()
        nlls = window_nlls(model, valid, 4, device)
        rows.append({"artifact": str(artifact), "valid_ppl": perplexity_of(nlls, seq_len),
                     "seconds": round(time.time() - t0, 1), "window_nll": nlls.tolist()})
        del model
    first = rows[0]
    print(f"domain_valid: {valid.shape[0]} windows of {seq_len} tokens, {dtype} on the {device}")
    print(f"{'artifact':70s} {'valid ppl':>9s}  change against the first [95% interval]")
    for row in rows:
        change = paired_change(row["window_nll"], first["window_nll"], seq_len) if row is not first else None
        if change is not None:
            row["change_percent"], row["low"], row["high"] = change.percent, change.low, change.high
        text = f"{change.percent:+.2f}% [{change.low:+.2f}, {change.high:+.2f}]" if change else "-"
        print(f"{row['artifact'][-70:]:70s} {row['valid_ppl']:9.3f}  {text}")
    pairs = []
    for i, j in args.pair:
        change = paired_change(rows[i]["window_nll"], rows[j]["window_nll"], seq_len)
        pairs.append({"artifact": rows[i]["artifact"], "against": rows[j]["artifact"], "change_percent": change.percent,
                      "low": change.low, "high": change.high, "told_apart": change.excludes_zero})
        print(f"{i} against {j}: {change.percent:+.2f}% [{change.low:+.2f}, {change.high:+.2f}]"
              + ("" if change.excludes_zero else " (not told apart)"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "compare_on_valid", "run_dir": str(args.run_dir),
                                        "windows": list(valid.shape), "device": device, "dtype": str(dtype),
                                        "rows": rows, "pairs": pairs,
                                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                                        "torch": torch.__version__}, indent=1) + "\n")
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
