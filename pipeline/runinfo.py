"""Reading a run directory's own records (run.json, .lock, stage manifests and states) for
`pipeline status`, `plan` and `run`, before anything acts on them.

A run directory can be damaged by hand edits, copies cut short or full disks. Each reader
here either returns what it read or raises one `InputError` (exit 2) that names the file,
says what is wrong with it and how to repair it; it never writes anything.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from qlora_pipeline.errors import InputError, RecipeError
from qlora_pipeline.rundir import MANIFEST, STATE, good_file_table

LOCK_SETTLE_SECONDS = 5  # a lock younger than this may still be being written (see rundir.RunLock)


def read_run_recipe(run_dir: Path):
    """The validated `Recipe` a run directory was last run with (run.json's "recipe").

    Raises:
        InputError: no run.json, or run.json not a JSON object, or without "recipe".
        RecipeError: the recorded recipe no longer validates (e.g. a local path it names was
            removed); one line per problem, naming the key path.
    """
    from qlora_pipeline.recipe import Recipe, _format_error

    run_json = run_dir / "run.json"
    if not run_dir.exists():
        raise InputError(f"{run_dir} does not exist; give a run directory `pipeline run` made (runs/<recipe name> "
                         "by default)")
    if not run_json.is_file():
        raise InputError(f"{run_dir} is not a run directory (no run.json); runs are created by `pipeline run`")
    again = f"running the recipe again (`pipeline run RECIPE --run-dir {run_dir}`)"
    rewrite, write_new = f"{again} rewrites it", f"{again} writes a new one"
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        # `run` refuses an unreadable run.json too (`check_records`): only deleting it helps.
        raise InputError(f"{run_json} is unreadable ({_describe(exc)}); delete it, then "
                         f"{write_new}") from None
    if not isinstance(record, dict):  # the runner cannot update it in place: it must go first
        raise InputError(f"{run_json} holds a JSON {type(record).__name__}, not an object; delete it, then "
                         f"{write_new}")
    if not isinstance(record.get("recipe"), dict):
        raise InputError(f"{run_json} holds no recipe (expected a \"recipe\" mapping); {rewrite}")
    try:
        return Recipe.model_validate(record["recipe"])
    except ValidationError as exc:
        problems = [_format_error(e) for e in exc.errors()]
        raise RecipeError(problems, source=f"{run_json} (the recipe this run was made with; {rewrite})") from None


def read_lock_holder(run_dir: Path) -> Optional[dict]:
    """The holder recorded in `run_dir/.lock` ({pid, host, started, ...}), or None without a lock.

    A lock whose content cannot be read is reported rather than guessed at: it may be a
    process that just created it (retried briefly) or a leftover.

    Raises:
        InputError: the lock file holds no readable holder.
    """
    lock = run_dir / ".lock"
    deadline = time.time() + 1.0
    while True:
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            holder = None
        if isinstance(holder, dict) and "pid" in holder:
            return holder
        try:
            young = time.time() - lock.stat().st_mtime < LOCK_SETTLE_SECONDS
        except FileNotFoundError:
            return None
        if not (young and time.time() < deadline):
            raise InputError(f"unreadable lock file {lock}; delete it if no pipeline process is running "
                             "in this run directory")
        time.sleep(0.1)  # its writer may be between creating and writing it


def check_records(run_dir: Path) -> None:
    """Refuse a run directory any of whose records is damaged (`damaged_records`).

    The one rule for a run directory's records, used by `run`, `plan` and `status` (through the
    CLI and `Runner.plan` alike): a record that exists must be one the runner can act on, else
    the command stops before anything is written, naming the file. Guessing would lose
    something either way: a damaged manifest may sit on a good output (a copy cut short, a hand
    edit), and re-running its stage would replace work that a restored manifest would have kept.

    Raises:
        InputError: one line naming every damaged file and what to do.
    """
    foreign = foreign_contents(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{run_dir} is not a pipeline run directory: it holds {shown} but no run.json or stage "
                         "record, and a run writes and replaces stage folders in it (data/, train/, ...); give "
                         "--run-dir (or run.dir and run.name) a new or empty folder")
    damaged = damaged_records(run_dir)
    if damaged:
        raise InputError(damaged_message(run_dir, damaged))


def damaged_message(run_dir: Path, damaged: list[str]) -> str:
    """The one line that names a run directory's damaged records and what to do."""
    return (f"damaged run directory {run_dir}: {'; '.join(damaged)}; delete {'it' if len(damaged) == 1 else 'them'} "
            "if no pipeline process is running there (a stage whose manifest is deleted runs again; a deleted "
            "state, run.json or lock is written anew)")


_OWN_LEFTOVERS = re.compile(r"\.lock|\.run\.json\.tmp-\d+")  # what a run leaves before run.json exists


def foreign_contents(run_dir: Path) -> list[str]:
    """The names in `run_dir`, an existing folder that no run has made (no run.json, no stage
    manifest or state: not a run directory whose run.json alone was deleted), that are not a
    run's own: a folder of the user's files given as --run-dir, whose `data/output` or
    `train/checkpoints` a run would replace. Empty for a missing or empty folder, or a run
    directory."""
    if not run_dir.is_dir() or (run_dir / "run.json").exists():
        return []
    if next(run_dir.glob(f"*/{MANIFEST}"), None) or next(run_dir.glob(f"*/{STATE}"), None):
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if not _OWN_LEFTOVERS.fullmatch(p.name))


def damaged_records(run_dir: Path) -> list[str]:
    """"<path> <what is wrong>" for every damaged record of `run_dir` (empty: none).

    run.json and every stage's manifest.json and state.json must be readable JSON objects of
    their shape (`RECORD_SHAPES`). The lock is the exception for readability: a process may be
    between creating and writing it, so an unreadable one is left to `RunLock` (taken over once
    stale) and `read_lock_holder`; a readable lock must still have its shape.
    """
    if not run_dir.is_dir():
        return []
    records = [run_dir / "run.json", run_dir / ".lock"]
    records += sorted(run_dir.glob(f"*/{MANIFEST}")) + sorted(run_dir.glob(f"*/{STATE}"))
    damaged = []
    for path in records:
        if not path.exists():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            if path.name != ".lock":
                damaged.append(f"{path} is unreadable ({_describe(exc)})")
            continue
        problem = record_problem(path.name, value)
        if problem:
            damaged.append(f"{path} {problem}")
    return damaged


@dataclass(frozen=True)
class RecordShape:
    """The fields of a record that the runner reads, by the JSON kind they must have. A field
    in `required` must be present; any other may be absent (older records lack some)."""

    required: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    mappings: tuple[str, ...] = ()
    integers: tuple[str, ...] = ()
    file_table: bool = False  # 'files': relative path -> {size, sha256}, required


RECORD_SHAPES = {
    MANIFEST: RecordShape(required=("fingerprint",), texts=("fingerprint",), file_table=True,
                          mappings=("files", "config", "code", "inputs", "cache", "metrics", "info")),
    STATE: RecordShape(texts=("fingerprint", "status", "host"), integers=("pid",)),
    "run.json": RecordShape(mappings=("recipe",)),
    ".lock": RecordShape(required=("pid",), texts=("host",), integers=("pid",)),
}


def record_problem(name: str, record: Any) -> Optional[str]:
    """What makes `record`, the parsed JSON of a record named `name` (manifest.json,
    state.json, run.json, .lock), unusable (None: nothing). The runner treats a record with a
    problem as no record at all; `check_records` refuses it before the runner sees it."""
    if not isinstance(record, dict):
        return f"holds JSON that is not an object (a {type(record).__name__})"
    shape = RECORD_SHAPES.get(name, RecordShape())
    for key in shape.required:
        if key not in record:
            return f"has no '{key}'"
    for key in shape.mappings:
        if key in record and not isinstance(record[key], dict):
            return f"has a '{key}' that is not an object"
    for key in shape.texts:
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"has a '{key}' that is not text"
    for key in shape.integers:
        if key in record and (not isinstance(record[key], int) or isinstance(record[key], bool)):
            return f"has a '{key}' that is not a number"
    if shape.file_table and not good_file_table(record.get("files")):
        return "has a malformed file table ('files': relative path -> {size, sha256})"
    return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
