"""The run directory on disk: atomic writes, manifests with sizes and hashes, the run lock.

A crash at any instant leaves either the previous complete state of a stage or no manifest
at all: outputs are built in `output.partial/`, fsynced, swapped into place, and the manifest
is written last by rename.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from qlora_pipeline.errors import InputError, RunLockedError

MANIFEST = "manifest.json"
STATE = "state.json"
OUTPUT = "output"
PARTIAL = "output.partial"
CHECKPOINTS = "checkpoints"


RUN_DIR_HINT = "set run.dir (or --run-dir) to a folder you can write"


def location_problem(run_dir: Path, probe: bool = False) -> Optional[str]:
    """Why a run directory cannot live at `run_dir` (None: it can). A file in the way or a
    parent the user cannot write would otherwise surface as a traceback from the first manifest
    read or mkdir. Without `probe` nothing is written; with it, an empty folder is made and
    removed again in the nearest existing folder, which catches what permission bits do not
    (a read-only or virtual file system, root's writes refused) before anything else, such as
    the tracking store, is touched."""
    if run_dir.exists():
        if not run_dir.is_dir():
            return f"{run_dir} exists and is not a folder"
        ancestor = run_dir
    else:
        ancestor = run_dir.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{ancestor} is a file, so {run_dir} cannot be created under it"
    where = "" if ancestor == run_dir else f"{run_dir} cannot be created: "
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{where}{ancestor} is not writable"
    if probe:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".qlp-probe-", dir=ancestor))
        except OSError as exc:
            return f"{where}cannot write in {ancestor} ({exc.strerror or exc})"
    return None


def create_run_dir(run_dir: Path) -> list[Path]:
    """mkdir -p, with a failure (a read-only or virtual file system, a full disk) as bad input
    naming the folder: nothing has been written yet when it happens. Returns the folders it
    created, outermost first, so that a run refused for bad input can take them away again."""
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()][::-1]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty_folders(missing)
        raise InputError(f"run directory {run_dir}: cannot create it ({exc.strerror or exc}); {RUN_DIR_HINT}") from None
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """rmdir each of `folders` (outermost first), innermost first, while they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one (a write
    that fails, e.g. on a full disk, leaves the old file and no temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename == str(tmp):
            exc.filename = str(path)  # the file the user knows, not our temporary name
        raise
    fsync_dir(path.parent)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_refused(path: Path, exc: OSError) -> InputError:
    """A write of the run directory's own records refused before any stage ran (a full disk, a
    read-only file system): bad input naming the file, nothing of a stage lost."""
    if is_disk_full(exc):
        return InputError(f"no space left on device while writing {path}; free some space and rerun the same command")
    return InputError(f"cannot write {path} ({exc.strerror or exc}); {RUN_DIR_HINT}")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`; None when the file is missing, not JSON or not an object
    (a damaged record reads as no record)."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def good_file_table(files: Any) -> bool:
    """A manifest's (or a cache entry's) file table: {relative path inside the output:
    {size: int, sha256: 64 hex}}. Verification, output digests and restores index into it: a
    hand-edited or half-copied one must read as damaged, not crash `plan` or point outside the
    output folder."""
    return isinstance(files, dict) and all(_good_file(rel, meta) for rel, meta in files.items())


def _good_file(rel: Any, meta: Any) -> bool:
    if not isinstance(rel, str) or not isinstance(meta, dict):
        return False
    path = PurePosixPath(rel)
    return (rel != "" and not path.is_absolute() and ".." not in path.parts
            and isinstance(meta.get("size"), int) and not isinstance(meta.get("size"), bool)
            and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def describe_files(root: Path) -> dict[str, dict]:
    """{relative path: {size, sha256, mtime_ns}} for every file under `root`, sorted."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        out[path.relative_to(root).as_posix()] = {
            "size": st.st_size,
            "sha256": sha256_file(path),
            "mtime_ns": st.st_mtime_ns,
        }
    return out


def verify_files(root: Path, files: dict[str, dict], full: bool = False, memo: Optional[dict] = None) -> list[str]:
    """Problems found comparing `root` with a manifest's file table (empty when all is well).

    Sizes are always checked. Hashes are checked when `full`, or when a file's mtime moved
    (an altered file); this keeps "skip when up to date" fast on multi-GB checkpoints.
    `memo` ({(path, size, mtime_ns): sha256}) saves hashing a file twice within one plan.
    """
    problems = []
    memo = {} if memo is None else memo
    # A file the table does not list was not published by the stage (planted, or left by a
    # copy): a downstream stage reading the folder (a model's shards, say) would read it too.
    if root.is_dir():
        problems += [f"{path}: not in the manifest (added)" for path in sorted(root.rglob("*"))
                     if path.is_file() and path.relative_to(root).as_posix() not in files]
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        st = path.stat()
        if st.st_size != meta["size"]:
            problems.append(f"{path}: size {st.st_size} bytes, manifest says {meta['size']} (truncated or altered)")
        elif full or st.st_mtime_ns != meta.get("mtime_ns"):
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in memo:
                memo[key] = sha256_file(path)
            if memo[key] != meta["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (altered)")
    return problems


# ----------------------------------------------------------------------------- sealed checkpoints

CHECKPOINT_RECORD = "complete"  # in a checkpoint folder: the size and sha256 of each of its files


def seal_checkpoint(folder: Path, **fields: Any) -> None:
    """Record the size and sha256 of every file in `folder` (a stage's checkpoint), written
    last: a checkpoint without a valid record is incomplete, and one whose files no longer
    match it is damaged (a disk error, a copy cut short), so a resume never loads from it."""
    files = {rel: {"size": meta["size"], "sha256": meta["sha256"]} for rel, meta in describe_files(folder).items()
             if rel != CHECKPOINT_RECORD}
    write_json_atomic(folder / CHECKPOINT_RECORD, {**fields, "files": files})


def is_sealed(folder: Path) -> bool:
    """Whether `folder` is a checkpoint with a record of its files (good or not)."""
    return folder.is_dir() and (folder / CHECKPOINT_RECORD).is_file()


def checkpoint_problems(folder: Path, full: bool = True, required: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the sealed checkpoint `folder` (empty: its files are as written, and
    the `required` ones among them). Sizes are always checked; hashes when `full` (a plan
    checks sizes, a resume hashes)."""
    record = read_json(folder / CHECKPOINT_RECORD)
    if record is None or not good_file_table(record.get("files")):
        return [f"{folder / CHECKPOINT_RECORD}: no valid record of its files (an incomplete checkpoint)"]
    problems = [f"{folder / name}: not in its checkpoint record" for name in required if name not in record["files"]]
    for rel, meta in record["files"].items():
        try:
            problem = _checkpoint_file_problem(folder / rel, meta, full)
        except OSError as exc:  # removed meanwhile (another rank discarding it), unreadable
            problem = f"{folder / rel}: unreadable ({exc.strerror or exc})"
        if problem:
            problems.append(problem)
    return problems


def _checkpoint_file_problem(path: Path, meta: dict, full: bool) -> Optional[str]:
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != meta["size"]:
        return f"{path}: size {size} bytes, its checkpoint record says {meta['size']} (truncated or altered)"
    if full and sha256_file(path) != meta["sha256"]:
        return f"{path}: sha256 differs from its checkpoint record (altered)"
    return None


def remove_path(path: Path) -> None:
    """Remove what is at `path`, one of a stage folder's own names (`output/`, `output.old/`,
    `output.partial/`, `checkpoints/`): a folder with its contents, or a file or link in its
    place (a copy gone wrong), which `shutil.rmtree` refuses with NotADirectoryError, so that
    every run after it failed the same way."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish_output(stage_dir: Path) -> Path:
    """Swap `output.partial/` into place as `output/` after fsyncing it.

    The caller has already removed the stage's manifest, so a crash here leaves no manifest
    pointing at a half-swapped directory.
    """
    partial, final, old = stage_dir / PARTIAL, stage_dir / OUTPUT, stage_dir / "output.old"
    fsync_tree(partial)
    remove_path(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(partial, final)
    fsync_dir(stage_dir)
    remove_path(old)
    return final


# ----------------------------------------------------------------------------- lock


def _process_start_time(pid: int) -> Optional[str]:
    """Kernel start time of `pid` (field 22 of /proc/PID/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    if pid <= 0:  # no process: os.kill(0 or -1, 0) signals a whole group and succeeds
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start_time(pid)
    return start is None or now is None or now == start


def holder_pid(holder: dict) -> Optional[int]:
    """The pid a lock's holder records, when a process can have it (None: a damaged lock;
    os.getpid() is never 0 or negative, and os.kill(-1, 0) would "find" a live process)."""
    pid = holder.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def lock_is_stale(holder: dict) -> bool:
    """Whether a lock with this holder is held by no live process: its pid is damaged, or the
    process died on this host (another host's processes cannot be checked from here)."""
    pid = holder_pid(holder)
    if pid is None:
        return True
    return holder.get("host") == socket.gethostname() and not _alive(pid, holder.get("proc_start"))


def describe_lock(holder: dict) -> str:
    """One line for `status` about the lock held by `holder`: live, or stale (a run takes it over)."""
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
    if lock_is_stale(holder):
        return f"stale lock left by {who} (no such process is running); the next run takes it over"
    return f"lock held by {who}"


@dataclass
class RunLock:
    """An exclusive lock on a run directory, held by one process (pid, host, start time).

    A lock left by a dead process on this host, or with a pid no process has, is recognised as
    stale and taken over.
    """

    path: Path
    held: bool = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "proc_start": _process_start_time(os.getpid()),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_a_non_file()
                holder = read_json(self.path)
                if holder is None:
                    # Written by a process that died between create and write, or garbage.
                    if self._age() < 5:
                        time.sleep(0.2)
                        continue
                    self.path.unlink(missing_ok=True)
                    continue
                if lock_is_stale(holder):
                    self.path.unlink(missing_ok=True)  # its process is gone, or never was
                    continue
                same_host = holder.get("host") == socket.gethostname()
                raise RunLockedError(
                    f"run directory {self.path.parent} is in use by pid {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')}; wait for it to finish"
                    + ("" if same_host else f", or delete {self.path} if that host's process is gone")
                )
            except OSError as exc:
                raise write_refused(self.path, exc) from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:  # an empty lock left behind would hold the next run up
                self.path.unlink(missing_ok=True)
                raise write_refused(self.path, exc) from None
            self.held = True
            return
        raise RunLockedError(f"could not take the lock {self.path}: it was (re)written moments ago with no readable "
                             "holder, as by another pipeline starting; rerun in a few seconds, or delete it if no "
                             f"pipeline process is running in {self.path.parent}")

    def _refuse_a_non_file(self) -> None:
        """A lock that is a folder (or anything but a file) is never taken over, nor made by the
        pipeline: only its removal by hand helps, so say that rather than 'try again'."""
        if self.path.exists() and not self.path.is_file():
            kind = "a folder" if self.path.is_dir() else "not a regular file"
            raise InputError(f"the lock {self.path} is {kind}, not a lock file the pipeline wrote; remove it "
                             f"(rm -r '{self.path}') and rerun")

    def _age(self) -> float:
        """Seconds since the lock file was last written (0 when it is gone: retry at once)."""
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def release(self) -> None:
        if self.held:
            holder = read_json(self.path)
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
