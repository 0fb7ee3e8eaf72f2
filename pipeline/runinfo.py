"""Reading a run directory's own records (run.json, .lock, stage manifests and states) for
`pipeline status`, `plan` and `run`, before anything acts on them.

A run directory can be damaged by hand edits, copies cut short or full disks. Each reader
here either returns what it read or raises one `InputError` (exit 2) that names the file,
says what is wrong with it and how to repair it; it never writes anything.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from qlora_pipeline.errors import InputError, RecipeError

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
    if not run_json.is_file():
        raise InputError(f"{run_dir} is not a run directory (no run.json); runs are created by `pipeline run`")
    rewrite = f"running the recipe again (`pipeline run RECIPE --run-dir {run_dir}`) rewrites it"
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{run_json} is unreadable ({_describe(exc)}); {rewrite}") from None
    if not isinstance(record, dict):  # the runner cannot update it in place: it must go first
        raise InputError(f"{run_json} holds a JSON {type(record).__name__}, not an object; delete it, then "
                         f"{rewrite.replace('rewrites', 'writes a new one')}")
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
    """Refuse a run directory whose records parse as JSON but are not objects, or not of their
    kind's shape (`record_problem`).

    The runner reads run.json, .lock and every stage's manifest.json and state.json as JSON
    objects; one that is unreadable counts as absent (the stage runs again, the lock is taken
    over once stale, run.json is rewritten), but a list or a string there, or an object whose
    fields are of the wrong kind (a file table that is a list, a pid that is text), would stop
    `run`, `plan` and `status` with a traceback. Nothing is written or deleted here.

    Raises:
        InputError: one line naming every such file and what to do.
    """
    if not run_dir.is_dir():
        return
    records = [run_dir / "run.json", run_dir / ".lock"]
    records += sorted(run_dir.glob("*/manifest.json")) + sorted(run_dir.glob("*/state.json"))
    damaged = []
    for path in records:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # absent or unreadable: the runner treats it as absent
        if not isinstance(value, dict):
            damaged.append(f"{path} holds JSON that is not an object")
        else:
            problem = record_problem(path.name, value)
            if problem:
                damaged.append(f"{path} {problem}")
    if damaged:
        raise InputError(f"damaged run directory {run_dir}: {'; '.join(damaged)}; delete "
                         f"{'it' if len(damaged) == 1 else 'them'} if no pipeline process is running there "
                         "(a stage whose record is deleted runs again)")


# The fields of each record that the runner reads, and the JSON kinds they must have. A field
# may be absent (older records lack some); present, it must be of its kind.
_MAPPINGS = {"manifest.json": ("files", "config", "code", "inputs", "cache", "metrics", "info"),
             "state.json": (), "run.json": ("recipe",), ".lock": ()}
_TEXTS = {"manifest.json": ("fingerprint",), "state.json": ("fingerprint", "status", "host"),
          "run.json": (), ".lock": ("host",)}


def record_problem(name: str, record: dict) -> Optional[str]:
    """What makes a JSON-object record of kind `name` (manifest.json, state.json, run.json,
    .lock) unusable (None: nothing): a field the runner reads that has the wrong kind."""
    from qlora_pipeline.rundir import good_file_table

    for key in _MAPPINGS.get(name, ()):
        if key in record and not isinstance(record[key], dict):
            return f"has a '{key}' that is not an object"
    for key in _TEXTS.get(name, ()):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"has a '{key}' that is not text"
    if "pid" in record and (not isinstance(record["pid"], int) or isinstance(record["pid"], bool)):
        return "has a 'pid' that is not a number"
    files = record.get("files") if name == "manifest.json" else None
    if files and not good_file_table(files):
        return "has a malformed file table ('files': relative path -> {size, sha256})"
    return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
