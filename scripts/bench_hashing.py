"""What verifying a stage's inputs costs: seconds per GB of sha256 over a file on this disk.

Every upstream file a running stage reads is hashed against its manifest first
(`run.verify_inputs`); this measures that rate (median of repeats, page cache warm, as it is
right after the upstream stage wrote the file).

    python scripts/bench_hashing.py --size-mb 1024 --repeats 3

Writes benchmarks/hashing.json and prints the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qlora_pipeline.rundir import sha256_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/hashing.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp) / "blob.bin"
        with open(path, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sha256_file(path)
            times.append(time.perf_counter() - t0)
    per_gb = statistics.median(times) / (args.size_mb / 1024)
    result = {"size_mb": args.size_mb, "repeats": args.repeats, "seconds": times, "seconds_per_gb": round(per_gb, 3),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"sha256: {per_gb:.2f} s per GB (median of {args.repeats} over {args.size_mb} MB)")


if __name__ == "__main__":
    main()
