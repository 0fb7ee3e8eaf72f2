"""The stage cache: finished stage outputs, content-addressed, shared by run directories.

An entry is keyed by a stage's fingerprint, which already covers its settings, its code and
the content of its inputs; equal fingerprints mean the stage would compute the same thing,
so a second run directory (or the same one after a change was undone) takes the output from
here instead of computing it again. Entries hold the files (hard links to the run
directory's files on the same filesystem, copies elsewhere) and `entry.json` with their
sizes and sha256, the stage's metrics and info. An entry appears whole or not at all (built
in a `.tmp-*` folder, then renamed) and is never modified afterwards: its files are made
read-only, which with hard links also makes the run directory's published files read-only, so
that an in-place write into either (an editor keeping hard links) fails instead of altering
the other. One whose files no longer match its table (root ignores file modes) is moved aside
and deleted, never used.

A cache folder that cannot be written is bad input, found before a run starts
(`check_writable`). Past that, nothing here may fail a stage: a cache that cannot take an
entry (full disk) is logged and the run goes on without it.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora_pipeline import rundir
from qlora_pipeline.errors import InputError
from qlora_pipeline.graph import output_digest
from qlora_pipeline.models import cache_root

logger = logging.getLogger(__name__)

ENV = "QLP_STAGE_CACHE"  # overrides run.cache.dir
ENTRY = "entry.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 24 * 3600  # a temporary folder this old was left by a process that died


def user_cache_dir() -> Path:
    """The default stage cache: `stages/` in the project's cache folder, next to the converted
    models (`models.cache_root`: $QLP_CACHE moves both)."""
    return cache_root() / "stages"


def short_key(key: str) -> str:
    """The part of a fingerprint that `plan` and the logs show."""
    return key[:8]


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: `record` is its entry.json."""

    key: str
    path: Path
    record: dict

    @property
    def files(self) -> dict[str, dict]:
        return self.record["files"]

    @property
    def output(self) -> Path:
        return self.path / rundir.OUTPUT

    @property
    def digest(self) -> str:
        """The output digest a run directory gets by restoring this entry."""
        return output_digest(self.files)


class StageCache:
    """A cache folder: `<root>/<fingerprint>/{entry.json, output/}`."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def find(self, key: str, full: bool, discard: bool) -> Optional[Entry]:
        """The entry for fingerprint `key` when its files match its table, else None.

        Sizes are always checked; hashes when `full` (the run's `verify_inputs`) or when a
        file's mtime moved. A bad entry is moved aside and deleted when `discard` (`run`),
        left alone otherwise (`plan` and `status` write nothing).
        """
        path = self.root / key
        try:
            if not path.is_dir():
                return None
            record = rundir.read_json(path / ENTRY)
            problem = record_problem(key, record)
            problems = [f"{path / ENTRY}: {problem}"] if problem else \
                rundir.verify_files(path / rundir.OUTPUT, record["files"], full=full)
        except OSError as exc:  # unreadable: as unusable as damaged (plan and status must not crash)
            problems = [f"{path}: cannot be read ({exc})"]
        if not problems:
            return Entry(key, path, record)
        if discard:
            logger.warning("stage cache: entry %s is damaged (%s); removed, not used", short_key(key), problems[0])
            self._remove(path)
        return None

    def store(self, key: str, output: Path, record: dict) -> None:
        """Add the published `output` of a stage whose fingerprint is `key`.

        `record` is entry.json less the mtimes: {stage, files (size, sha256), metrics, ...}.
        An existing good entry is kept as it is; any failure is logged, never raised.
        """
        if self.find(key, full=False, discard=True) is not None:
            return
        tmp = self.root / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self._sweep()
            (tmp / rundir.OUTPUT).mkdir(parents=True)
            place_files(output, tmp / rundir.OUTPUT, record["files"])
            read_only(tmp / rundir.OUTPUT, record["files"])
            files = with_mtimes(tmp / rundir.OUTPUT, record["files"])
            rundir.write_json_atomic(tmp / ENTRY, {**record, "fingerprint": key, "files": files,
                                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            rundir.fsync_tree(tmp)
            os.rename(tmp, self.root / key)
            rundir.fsync_dir(self.root)
            logger.info("stage cache: stored %s (%s) in %s", record.get("stage"), short_key(key), self.root)
        except OSError as exc:
            if (self.root / key).is_dir() and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return  # another process stored the same result first
            logger.warning("stage cache: could not store %s (%s) in %s: %s; the stage's own output is unaffected",
                           record.get("stage"), short_key(key), self.root, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def check_writable(self) -> None:
        """InputError unless the cache folder can be created and written: checked before a run
        starts, so a folder the user cannot write stops it with one message, not a warning per
        stage."""
        probe = self.root / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(
                f"stage cache {self.root}: cannot write there ({exc.strerror or exc}); give a folder you can write "
                f"(run.cache.dir, or ${ENV}) or turn the cache off (--set run.cache.enabled=false)") from None

    def _remove(self, path: Path) -> None:
        """Move an entry aside (gone for every reader at once), then delete it."""
        aside = self.root / f"{TMP_PREFIX}broken-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except OSError:
            return  # already removed by another process
        shutil.rmtree(aside, ignore_errors=True)

    def _sweep(self) -> None:
        """Delete temporary folders left by processes that died while storing."""
        if not self.root.is_dir():
            return
        now = time.time()
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            try:
                if now - path.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def place_files(src: Path, dest: Path, files: dict[str, dict]) -> None:
    """Put the files of a file table from `src` under `dest`: hard links where the
    filesystem allows, else copies (with their mtimes)."""
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, target)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.copy2(src / rel, target)


def read_only(root: Path, files: dict[str, dict]) -> None:
    """Clear the write bits of the table's files under `root` (see the module docstring)."""
    for rel in files:
        path = root / rel
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def record_problem(key: str, record: Optional[dict]) -> Optional[str]:
    """What makes entry.json unusable as the record of fingerprint `key` (None: nothing).

    Its file table drives verification and where files are placed: a malformed one must read
    as a damaged entry, not crash `plan` or put files outside the stage's output.
    """
    if record is None or record.get("fingerprint") != key:
        return f"missing or not a record of {key}"
    if not rundir.good_file_table(record.get("files")):
        return "malformed file table"
    if not all(isinstance(record.get(k, {}), dict) for k in ("metrics", "info", "parent_metrics")):
        return "malformed metrics or info"
    if not all(isinstance(v, (int, float)) for k in ("metrics", "parent_metrics") for v in record.get(k, {}).values()):
        return "metrics that are not numbers"
    return None


def with_mtimes(root: Path, files: dict[str, dict]) -> dict[str, dict]:
    """A file table with each file's mtime as it is now under `root` (sizes and hashes kept):
    what verification compares to decide whether to hash."""
    return {rel: {**meta, "mtime_ns": (root / rel).stat().st_mtime_ns} for rel, meta in files.items()}


def open_cache(settings) -> Optional[StageCache]:
    """The stage cache a recipe's `run.cache` asks for (None when disabled): $QLP_STAGE_CACHE,
    else `run.cache.dir`, else the user cache folder."""
    if not settings.enabled:
        return None
    return StageCache(Path(os.environ.get(ENV) or settings.dir or user_cache_dir()).expanduser())
