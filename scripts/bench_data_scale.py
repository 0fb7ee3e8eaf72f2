"""How the `data` stage scales with the size of a local domain corpus.

Builds corpora of about `--sizes` MB (UTF-8 bytes) from the text files of this machine's Python
installation (the `.py`, `.pyi`, `.rst`, `.md` and `.txt` files under the standard library,
/usr/lib/python3/ and the virtual environment's site-packages): one document per file,
exact duplicates and files that are empty, over 1 MB, not UTF-8 or hold NUL bytes left out,
in a seeded random order, each corpus the first documents of that order (the smaller corpora
are prefixes of the larger), written as a folder of `.txt` files, one per document (and, with
`--jsonl`, the same documents as one JSON Lines file, `{"text": ...}` a line). Then for each
corpus it runs `pipeline run RECIPE --only data` in a process of its own under
`/usr/bin/time -v` with a new run directory and stage cache, the recipe being
recipes/smollm2_domain.yaml with `data.domain: {path: CORPUS}` and `data.general: null` (the
corpora hold the standard library, which python-stdlib would also read), and reports wall
time, peak RSS and seconds per MB. A run is stopped at `--timeout` seconds, or when the
process tree's resident memory passes `--max-rss-gib`; the larger sizes are then skipped.

With `--profile MB` it runs that size once more under cProfile and prints the 25 functions
with the most cumulative and the most own time.

The corpora depend on what is installed (their digest is recorded); on the 2-core development
machine a size takes from seconds to minutes.

    python scripts/bench_data_scale.py [--sizes 5 10 20 40] [--jsonl 20] [--profile 20]
        [--workdir DIR] [--out benchmarks/data_scale.json] [--merge] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pstats
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_domain.yaml"
PIPELINE = [sys.executable, "-m", "qlora_pipeline.cli"]
SUFFIXES = {".py", ".pyi", ".rst", ".md", ".txt"}
MAX_FILE_BYTES = 1 << 20
MB = 1_000_000
STAGE_LINE = re.compile(r"^data\s+done\s+in ([\d.]+)s", re.M)


def source_roots() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/lib/python3"), Path(sysconfig.get_paths()["purelib"])]
    return [r for r in dict.fromkeys(r.resolve() for r in roots) if r.is_dir()]


def documents(seed: int = 0) -> list[str]:
    """Every usable text file of `source_roots`, once per content, in a seeded random order."""
    paths = sorted({p for root in source_roots() for p in root.rglob("*")
                    if p.suffix in SUFFIXES and "__pycache__" not in p.parts and p.is_file()})
    seen, docs = set(), []
    for p in paths:
        try:
            raw = p.read_bytes()
        except OSError:
            continue
        if len(raw) > MAX_FILE_BYTES or b"\0" in raw or not raw.strip():
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen:
            continue
        try:
            docs.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        seen.add(digest)
    random.Random(seed).shuffle(docs)
    return docs


def build(docs: list[str], mb: float, root: Path, jsonl: bool) -> dict:
    """The first documents of `docs` up to `mb` MB, as a folder of .txt files (or one .jsonl)."""
    chosen, total = [], 0
    for d in docs:
        if total >= mb * MB:
            break
        chosen.append(d)
        total += len(d.encode("utf-8"))
    if total < mb * MB * 0.95:
        sys.exit(f"only {total / MB:.1f} MB of text on this machine, not {mb} MB")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    digest = hashlib.sha256()
    if jsonl:
        with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
            for d in chosen:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    else:
        width = len(str(len(chosen)))
        for i, d in enumerate(chosen):
            (root / f"{i:0{width}d}.txt").write_text(d, encoding="utf-8")
    for d in chosen:
        digest.update(hashlib.sha256(d.encode("utf-8")).digest())
    return {"documents": len(chosen), "mb": round(total / MB, 2), "chars": sum(map(len, chosen)),
            "content_sha256": digest.hexdigest()[:16]}


def recipe(work: Path, corpus: Path) -> Path:
    text = RECIPE.read_text()
    for old, new in (("  domain: {builtin: python-docs}", f"  domain: {{path: {corpus}}}"),
                     ("  general: {builtin: python-stdlib}", "  general: null")):
        if old not in text:
            sys.exit(f"{RECIPE}: no line '{old.strip()}' to replace")
        text = text.replace(old, new)
    path = work / f"{corpus.name}.yaml"
    path.write_text(text)
    return path


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(work: Path, label: str, recipe_path: Path, timeout: float, max_rss: int,
              profile: Path | None = None, settings: tuple[str, ...] = ()) -> dict:
    """`pipeline run --only data` in a new run directory and stage cache, under /usr/bin/time -v."""
    run_dir, cache = work / f"run-{label}", work / f"cache-{label}"
    for d in (run_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    entry = [sys.executable, "-m", "cProfile", "-o", str(profile), *PIPELINE[1:]] if profile else PIPELINE
    cmd = ["/usr/bin/time", "-v", *entry, "run", str(recipe_path), "--run-dir", str(run_dir), "--only", "data",
           "--set", "tracking.enabled=false", *[a for kv in settings for a in ("--set", kv)]]
    env = {**os.environ, "QLP_STAGE_CACHE": str(cache)}
    log_out, log_err = open(work / f"{label}.out", "w+"), open(work / f"{label}.err", "w+")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log_out, stderr=log_err)
    watch, peak_seen, stopped = psutil.Process(proc.pid), 0, None
    while proc.poll() is None:
        try:
            rss = tree_rss(watch)
        except psutil.Error:
            rss = 0
        peak_seen = max(peak_seen, rss)
        if time.time() - t0 > timeout:
            stopped = f"over {timeout:.0f} s"
        elif rss > max_rss:
            stopped = f"resident memory {rss / 2**30:.1f} GiB > {max_rss / 2**30:.1f} GiB"
        if stopped:
            for p in [*watch.children(recursive=True), watch]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()
            break
        time.sleep(0.2)
    wall = time.time() - t0
    log_out.seek(0), log_err.seek(0)
    out, err = log_out.read(), log_err.read()
    log_out.close(), log_err.close()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    stage = STAGE_LINE.search(out + err)
    row = {"wall_s": round(wall, 1), "stage_s": float(stage.group(1)) if stage else None,
           "peak_rss_gib": round(int(peak.group(1)) * 1024 / 2**30, 2) if peak else round(peak_seen / 2**30, 2),
           "returncode": proc.returncode, "stopped": stopped}
    if proc.returncode != 0 and not stopped:
        said = [line for line in err.splitlines() if line.startswith(("error:", "Traceback"))]
        row["error"] = "\n".join(said) or err[-2000:]
    summary = run_dir / "data" / "output" / "data.json"
    if summary.exists() and not profile:
        s = json.loads(summary.read_text())
        row["splits"] = {k: s[k] for k in s if k.endswith(("_documents", "_tokens"))}
        row["removed_chars"] = s["decontamination"]["removed_chars"]
    shutil.rmtree(cache, ignore_errors=True)  # a copy of the output; the run directory keeps it
    return row


def top(profile: Path, key: str, n: int = 25) -> str:
    buf = io.StringIO()
    pstats.Stats(str(profile), stream=buf).strip_dirs().sort_stats(key).print_stats(n)
    return buf.getvalue()


def code_version() -> str:
    """The commit measured, with "+changes" when the code in the working tree differs from it
    (the benchmark's own JSON files do not count: a second run writes beside the first's)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="*", default=[5, 10, 20, 40], help="corpus sizes, MB")
    parser.add_argument("--jsonl", type=float, nargs="*", default=[20], help="sizes also run as one JSON Lines file")
    parser.add_argument("--profile", type=float, default=None, help="one size run once more under cProfile")
    parser.add_argument("--timeout", type=float, default=590, help="seconds per run")
    parser.add_argument("--max-rss-gib", type=float, default=15.0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "data_scale.json")
    parser.add_argument("--merge", action="store_true", help="keep the rows of --out for sizes not run now")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe setting for every run, as `pipeline run --set` takes it (repeatable)")
    args = parser.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="data-scale-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    docs = documents()
    print(f"{len(docs)} distinct documents, {sum(len(d.encode()) for d in docs) / MB:.0f} MB "
          f"({time.time() - t0:.0f} s to collect)", flush=True)
    jobs = [(mb, False) for mb in sorted(args.sizes)] + [(mb, True) for mb in sorted(args.jsonl)]
    rows, blown = [], None
    for mb, jsonl in jobs:
        label = f"{mb:g}mb{'-jsonl' if jsonl else ''}"
        if blown is not None and mb > blown:
            print(f"{label}: skipped ({blown:g} MB was stopped)")
            continue
        corpus = build(docs, mb, work / f"corpus-{label}", jsonl)
        row = {"label": label, "format": "jsonl" if jsonl else "txt folder", **corpus,
               **run_stage(work, label, recipe(work, work / f"corpus-{label}"), args.timeout,
                           int(args.max_rss_gib * 2**30), settings=tuple(args.settings))}
        row["s_per_mb"] = round(row["wall_s"] / row["mb"], 2)
        rows.append(row)
        print(f"{label}: {row['wall_s']} s, {row['peak_rss_gib']} GiB"
              + (f", STOPPED: {row['stopped']}" if row["stopped"] else "")
              + (f", FAILED ({row['returncode']}):\n{row['error']}" if row.get("error") else ""), flush=True)
        if row["stopped"] or row.get("error"):
            blown = mb
    profile = None
    if args.profile is not None:
        label = f"{args.profile:g}mb"
        corpus = work / f"corpus-{label}"
        if not corpus.is_dir():
            build(docs, args.profile, corpus, False)
        prof = work / f"prof-{label}.out"
        row = run_stage(work, f"{label}-profiled", recipe(work, corpus), args.timeout,
                        int(args.max_rss_gib * 2**30), profile=prof, settings=tuple(args.settings))
        if prof.exists():
            cumulative, own = top(prof, "cumulative"), top(prof, "tottime")
            print(f"\n--- {label} under cProfile ({row['wall_s']} s): top 25 by cumulative time\n{cumulative}"
                  f"\n--- top 25 by own time (tottime)\n{own}")
            profile = {"size_mb": args.profile, "wall_s": row["wall_s"], "file": str(prof),
                       "cumulative": cumulative.splitlines(), "tottime": own.splitlines()}
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        have = {r["label"] for r in rows}
        rows = sorted([r for r in old.get("rows", []) if r["label"] not in have] + rows,
                      key=lambda r: (r["format"] != "txt folder", r["mb"]))
        profile = profile or old.get("profile")
    print(f"\n{'corpus':<12} {'MB':>7} {'docs':>7} {'wall s':>8} {'stage s':>8} {'peak RSS GiB':>13} {'s/MB':>6}")
    for r in rows:
        stage = f"{r['stage_s']:.1f}" if r.get("stage_s") is not None else "-"
        print(f"{r['label']:<12} {r['mb']:>7.1f} {r['documents']:>7} {r['wall_s']:>8.1f} {stage:>8} "
              f"{r['peak_rss_gib']:>13.2f} {r['s_per_mb']:>6.2f}" + (f"  stopped: {r['stopped']}" if r["stopped"] else "")
              + (f"  FAILED (exit {r['returncode']}): {r['error'][:160]}" if r.get("error") else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "recipe": f"{RECIPE.relative_to(REPO)} with data.domain: {{path: CORPUS}}, data.general: null",
        "settings": args.settings, "code": code_version(),
        "sources": [str(r) for r in source_roots()], "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "rows": rows, "profile": profile,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
