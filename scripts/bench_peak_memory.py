"""Does an evaluation's CPU peak-memory figure depend on what ran before it in the process?

The evaluate stage reports, on the CPU, the resident memory above the process's level before
loading (`PeakMemory`), after handing back the heap that earlier work freed
(`release_freed_heap`). This re-runs one evaluate stage of a finished run directory several
times in one process (`pipeline run RECIPE --run-dir RUN_DIR --only evaluate-ARTIFACT --force`,
tracking off), once with that hand-back and once without it, each mode in a fresh process, and
prints the figure of every repeat: without it, the repeats after the first read less (they
reuse the heap the previous one freed); with it they agree. The first repeat of a process also
carries the process's one-time costs.

    python scripts/bench_peak_memory.py recipes/smollm2_domain.yaml RUN_DIR --artifact gptq-w4g64

The stage's outputs in RUN_DIR are replaced by the re-run's (the same perplexities); its
upstream stages must be up to date under the code that runs this. Writes
benchmarks/peak_memory.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

MODES = ("release", "no-release")


def _child(recipe: str, run_dir: str, artifact: str, repeats: int, mode: str) -> None:
    from qlora_pipeline.cli import main as cli
    from qlora_pipeline.stages import evaluate

    if mode == "no-release":
        evaluate.release_freed_heap = lambda: None  # PeakMemory looks the name up at each entry
    stage = f"evaluate-{artifact}"
    peaks = []
    for _ in range(repeats):
        code = cli(["run", recipe, "--run-dir", run_dir, "--only", stage, "--force", "--set", "tracking.enabled=false"])
        if code:
            sys.exit(f"{stage} exited {code}")
        metrics = json.loads((Path(run_dir) / stage / "output" / evaluate.METRICS_FILE).read_text())
        peaks.append(metrics["peak_memory_bytes"])
    print(json.dumps(peaks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("run_dir")
    ap.add_argument("--artifact", default="gptq-w4g64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/peak_memory.json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.recipe, args.run_dir, args.artifact, args.repeats, args.child)
        return
    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, args.recipe, args.run_dir, "--artifact", args.artifact,
                               "--repeats", str(args.repeats), "--child", mode], capture_output=True, text=True)
        if done.returncode:  # e.g. the run directory's upstream stages are stale under this code
            sys.exit(f"{mode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        peaks = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"mode": mode, "peak_mb": [round(p / 1e6, 1) for p in peaks]})
    print(f"evaluate-{args.artifact}, {args.repeats} repeats per process; peak memory (MB) per repeat")
    for row in rows:
        print(f"  {row['mode']:<11} " + "  ".join(f"{p:8.1f}" for p in row["peak_mb"]))
    Path(args.out).write_text(json.dumps({"benchmark": "peak_memory", "artifact": args.artifact,
                                          "repeats": args.repeats, "rows": rows, "machine": platform.machine(),
                                          "python": platform.python_version()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
