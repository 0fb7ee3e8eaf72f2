"""Where AWQ's scale and clip search spends its time, per part, on a finished run's merged model.

Runs the float-model search (the `awq-search` stage's work, 4-bit groups of 64, the recipe's
default 8 search windows) over the first `--layers` decoder layers and times its parts:

- capture forward: the layer over every calibration window, accumulating each scaling
  group's X^T X and channel means;
- candidate block forwards: the attention block and the MLP on the search windows, once per
  grid point and once with s = 1, per scaling group;
- candidate pseudo-quantization: each candidate's Q(W diag(s)) diag(1/s);
- clip search: the clipping grid on the folded weights, from the Gram blocks;
- next-layer forward: the searched layer over every window, the next layer's inputs;
- other: the rest (the block forwards' float references, loading the layer, statistics).

The forwards are matmuls; the share of the search they take is what issue 15's "dominated by
matmuls, not Python" asks about. Repeated runs must give the same search result bit for bit
(else the script fails); the fastest run is kept (the machine is noisy).

    python scripts/bench_awq_search.py RUN_DIR [--layers 4] [--repeats 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# (part, the function of qlora_pipeline.layerwise.awq_search timed as that part)
PARTS = (("capture forward", "capture"), ("candidate block forwards", "_block_loss"),
         ("candidate pseudo-quantization", "scaled_quantized"), ("clip search", "search_layer_clip"))
FORWARDS = ("capture forward", "candidate block forwards", "next-layer forward")


class _Done(Exception):
    pass


def _timed(times: dict, part: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[part] += time.perf_counter() - t0
    return wrapper


def search_once(run_dir: Path, layers: int, search_windows: int, out_dir: Path) -> dict:
    """Time the float search over the first `layers` layers, writing its result to `out_dir`."""
    from safetensors.torch import load_file

    import qlora_pipeline.layerwise.awq_search as awq_layer
    import qlora_pipeline.layerwise.engine as engine
    from qlora_pipeline.layerwise.checkpoints import read_config
    from qlora_pipeline.layerwise.families import family_for
    from qlora_pipeline.stages.calibrate import CALIBRATION_FILE

    merged = run_dir / "merge" / "output"
    calibration = load_file(str(run_dir / "calibrate" / "output" / CALIBRATION_FILE))["input_ids"]
    family = family_for(read_config(merged)["model_type"])
    times: dict[str, float] = defaultdict(float)
    originals = {name: getattr(awq_layer, name) for _, name in PARTS}
    forward = engine._forward
    for part, name in PARTS:  # the search looks these up as module globals at call time
        setattr(awq_layer, name, _timed(times, part, originals[name]))
    engine._forward = _timed(times, "next-layer forward", forward)

    def first_layers(items, **kwargs):
        for i in items:
            if i >= layers:
                raise _Done
            yield i

    transform = awq_layer.make_transform(family, awq_layer.AWQSettings(4, 64, True, True, search_windows), out_dir,
                                         torch.bfloat16)
    t0 = time.perf_counter()
    try:
        engine.transform_sequentially(merged, calibration, family, transform, first_layers, lambda i, m: None)
    except _Done:
        pass
    finally:
        total = time.perf_counter() - t0
        for name, fn in originals.items():
            setattr(awq_layer, name, fn)
        engine._forward = forward
    parts = [p for p, _ in PARTS] + ["next-layer forward"]
    times["other"] = total - sum(times[p] for p in parts)
    return {"layers": layers, "total_seconds": total, **{p: times[p] for p in parts + ["other"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run directory of the default recipe (merge, calibrate)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--search-windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs; the fastest is reported")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "awq_search_parts.json")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            out_dir = Path(tmp) / str(r)
            out_dir.mkdir()
            runs.append(search_once(args.run_dir, args.layers, args.search_windows, out_dir))
            print(f"  run {r}: {runs[-1]['total_seconds']:.1f} s", flush=True)
        first = Path(tmp) / "0"
        for r in range(1, args.repeats):  # the same scales and clips, to the bit
            for f in sorted(first.iterdir()):
                if (Path(tmp) / str(r) / f.name).read_bytes() != f.read_bytes():
                    raise SystemExit(f"FAIL: {f.name} differs between run 0 and run {r}")
    best = min(runs, key=lambda row: row["total_seconds"])
    best["forwards_share"] = sum(best[p] for p in FORWARDS) / best["total_seconds"]
    print(f"\nAWQ float search, first {args.layers} layers of {args.run_dir}, 4-bit g64, {args.search_windows} "
          f"search windows (fastest of {args.repeats} runs, identical results)\n\n| part | seconds | share |\n|---|---|---|")
    for part in [p for p, _ in PARTS] + ["next-layer forward", "other", "total_seconds"]:
        print(f"| {part.replace('_seconds', '')} | {best[part]:.1f} | {100 * best[part] / best['total_seconds']:.0f}% |")
    print(f"\nforwards (matmuls): {best['forwards_share']:.0%} of the search; "
          f"{best['total_seconds'] / args.layers:.1f} s per layer")
    args.out.write_text(json.dumps({"benchmark": "awq_search_parts", "run_dir": str(args.run_dir),
                                    "search_windows": args.search_windows, "repeats": args.repeats, **best,
                                    "runs_seconds": [r["total_seconds"] for r in runs], "cpus": os.cpu_count(),
                                    "machine": platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
