"""The stage cache across run directories, measured on the default recipe.

Run directory A computes the stages that do not depend on training (data, base and the two
base evaluations) with an empty stage cache; run directory B, whose recipe differs only in
`train.steps`, then runs the same stages, which it should take from the cache. Each stage runs
as its own `pipeline run --only STAGE` process; the table gives the process's wall time and
what the run summary says the stage took (for B: the restore, verification included).

    python scripts/bench_stage_cache.py [--workdir DIR] [--out benchmarks/stage_cache.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_domain.yaml"
STAGES = ("data", "base", "evaluate-base", "evaluate-base-nf4")
SUMMARY_LINE = re.compile(r"^\s+(\S+)\s+(ran|cached|resumed)\s+([\d.]+) s", re.M)


def run_stage(run_dir: Path, stage: str, sets: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "qlora_pipeline.cli", "run", str(RECIPE), "--run-dir", str(run_dir),
           "--only", stage, *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    found = {m.group(1): (m.group(2), float(m.group(3))) for m in SUMMARY_LINE.finditer(proc.stdout + proc.stderr)}
    outcome, seconds = found.get(stage, ("?", float("nan")))
    return {"stage": stage, "outcome": outcome, "stage_seconds": seconds, "process_seconds": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "stage_cache.json")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stage-cache-"))
    env = {**os.environ, "QLP_STAGE_CACHE": str(work / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    rows = []
    for label, run_dir, sets in (("A", work / "A", []), ("B: train.steps changed", work / "B", ["train.steps=31"])):
        for stage in STAGES:
            rows.append({"run": label, **run_stage(run_dir, stage, sets, env)})
    print(f"{'run':<24} {'stage':<20} {'outcome':<8} {'stage s':>8} {'process s':>10}")
    for r in rows:
        print(f"{r['run']:<24} {r['stage']:<20} {r['outcome']:<8} {r['stage_seconds']:>8.1f} {r['process_seconds']:>10.1f}")
    args.out.write_text(json.dumps({"recipe": str(RECIPE.relative_to(REPO)), "cpus": os.cpu_count(), "rows": rows,
                                    "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
