"""The train stage's own peak RSS, and the part of the stage it falls in.

    python scripts/train_stage_memory.py RECIPE [--set KEY=VALUE ...] [--label NAME]
        [--out benchmarks/train_stage_memory.json]

Runs `pipeline run RECIPE --only train --force` in this process (the run directory's `data`
and `base` must be done) while a thread samples the resident memory every 20 ms, labelled by
what the stage is doing: loading the NF4 base, the training loop, the in-loop validation
(`eval_loss`), writing a checkpoint. `scripts/train_memory_phases.py` takes the same training
step apart outside the stage; this is the stage itself, with everything around the step.

glibc keeps freed memory for reuse instead of handing it back, so RSS is the high-water mark
of live tensors plus what the heap kept. Run it again with MALLOC_MMAP_THRESHOLD_=131072 in the
environment (every allocation of 128 KiB and more gets its own mapping and is unmapped when
freed) to see the live part alone: the difference is the allocator's. Results are appended
to --out under --label (default: the loss and the allocator setting).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

GIB = 2**30


def rss_gib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 / GIB


class Sampler:
    """The highest RSS seen, overall and per label."""

    def __init__(self):
        self.label = "outside the stage (planning, recording)"
        self.peak: dict[str, float] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss, label = rss_gib(), self.label
            self.peak[label] = max(self.peak.get(label, 0.0), rss)
            time.sleep(0.02)

    def labelled(self, module, name: str, label: str) -> None:
        """Label the time spent in `module.name`."""
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            outer, self.label = self.label, label
            try:
                return fn(*args, **kwargs)
            finally:
                self.label = outer

        setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/train_stage_memory.json"))
    args = ap.parse_args()

    sampler = Sampler()
    from qlora_pipeline import cli
    from qlora_pipeline.stages import train

    sampler.labelled(train, "load_nf4_model", "load the NF4 base")
    sampler.labelled(train, "eval_loss", "in-loop validation")
    sampler.labelled(train, "save_checkpoint", "checkpoint")
    sampler.labelled(train, "run", "training steps and the rest")  # the labels above nest inside it
    t0 = time.time()
    code = cli.main(["run", args.recipe, "--only", "train", "--force", *[a for o in args.overrides for a in ("--set", o)]])
    seconds = time.time() - t0
    if code:
        raise SystemExit(f"the train stage did not finish (exit {code})")
    peak_label = max(sampler.peak, key=sampler.peak.get)
    allocator = f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}" \
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc default"
    label = args.label or allocator
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    record = {"label": label, "allocator": allocator, "overrides": args.overrides, "code": commit,
              "seconds": round(seconds, 1),
              "peak_rss_gib": round(sampler.peak[peak_label], 3), "peak_during": peak_label,
              "peak_by_part_gib": {k: round(v, 3) for k, v in sampler.peak.items()},
              "loadavg_at_end": os.getloadavg()}
    print(f"{label}: peak RSS {record['peak_rss_gib']:.2f} GiB during {peak_label}; by part: "
          + ", ".join(f"{k} {v:.2f}" for k, v in record["peak_by_part_gib"].items()) + f"; {seconds:.0f} s")
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    runs = earlier["runs"]
    for r in runs:  # records of the file's first layout share one top-level "overrides"
        r.setdefault("overrides", earlier.get("overrides", []))
    runs = [r for r in runs if r["label"] != label] + [record]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "train_stage_memory", "recipe": args.recipe, "runs": runs},
                                   indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
