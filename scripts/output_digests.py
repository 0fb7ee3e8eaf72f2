"""The outputs of a run directory as digests, to check that two runs made the same artifacts.

Every stage output file is listed by sha256, except the files that hold measurements: an
evaluation's `metrics.json` and the report's `metrics.json` are listed by their values without
the timings (load time, peak memory, throughput, quantize and search seconds), and the report's text and
plots, which show those timings, are left out.

    python scripts/output_digests.py RUN_DIR [--out FILE.json] [--against OTHER.json]

With --against, prints the files whose digest differs (or that only one side has) and exits 1
if there are any: how the README's "byte-identical outputs" claims are checked.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

TIMING_KEYS = {"load_seconds", "peak_memory_bytes", "quantize_seconds", "search_seconds", "prefill_tokens_per_second",
               "decode_tokens_per_second"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def outputs(run_dir: Path) -> dict[str, object]:
    """{file relative to the run directory: sha256, or its measured values without timings}."""
    out: dict[str, object] = {}
    for path in sorted(Path(run_dir).glob("*/output/**/*")):
        if not path.is_file():
            continue
        rel = path.relative_to(run_dir).as_posix()
        stage = rel.split("/", 1)[0]
        if stage == "report":
            if path.name == "metrics.json":
                artifacts = json.loads(path.read_text())["artifacts"]
                out[rel] = {a: {k: v for k, v in m.items() if k not in TIMING_KEYS} for a, m in artifacts.items()}
            continue  # the report's text and plots show the timings
        if stage.startswith("evaluate-") and path.name == "metrics.json":
            out[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}
        else:
            out[rel] = sha256(path)
    return out


def differences(ours: dict, theirs: dict) -> list[str]:
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write the digests here (JSON)")
    parser.add_argument("--against", type=Path, help="digests of another run (JSON from --out) to compare with")
    args = parser.parse_args()
    digests = outputs(args.run_dir)
    if args.out:
        args.out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"{len(digests)} output files in {args.run_dir}")
    if args.against:
        differing = differences(digests, json.loads(args.against.read_text()))
        for name in differing:
            print(f"differs: {name}")
        print("identical" if not differing else f"{len(differing)} differ")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
