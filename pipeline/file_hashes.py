"""Content hashes of model and data files, remembered between commands.

A stage fingerprint names the weights it was made from by their content: size and mtime
alone are kept by `cp -p`, `rsync -t` or `touch -r`, so another checkpoint of the same shapes
copied over the old one would leave every stage "up to date" and the stage cache would hand
out the old model's outputs. Hashing is about 1 s per GB here, too slow to repeat for a 16 GB
checkpoint at every `validate`, `plan` and `run`, so each file's sha256 is remembered under
its identity on disk: device, inode, size, mtime and ctime. The kernel sets a file's ctime on
every write and metadata change and no user-space call sets it back (`touch -r` restores the
mtime, and in doing so updates the ctime), so a file rewritten in place is hashed again.
File times tick coarsely (a few ms), so a write in the same tick as the one remembered would
keep its ctime: as git does for its index, a file changed within `RACY_SECONDS` of being
hashed is not remembered, and is hashed again next time.

The memo (`file_hashes.json` in the user cache folder, `models.cache_root`) is only a speed-up:
unreadable, missing or unwritable, every file is hashed again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

MEMO_FILE = "file_hashes.json"
MAX_ENTRIES = 4096  # the most recent; a 70B checkpoint has a few dozen files
# Smaller files are hashed every time (cheap to read) and never enter the memo, so a corpus of
# thousands of small documents cannot push a model's entries out of it.
MEMO_MIN_BYTES = 1 << 20
RACY_SECONDS = 2
_now_ns = time.time_ns  # the clock the racy rule reads (tests move it)


def _memo_path() -> Path:
    from qlora_pipeline.models import cache_root

    return cache_root() / MEMO_FILE


def _identity(path: Path) -> tuple[str, int]:
    """(the memo's key for `path` as it is on disk, its ctime in ns)."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}", st.st_ctime_ns


def _load(memo_path: Path) -> dict[str, str]:
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return memo if isinstance(memo, dict) else {}


def sha256_files(paths: list[Path]) -> dict[Path, str]:
    """{path: sha256 of its content} for `paths`, from the memo where a file is unchanged on
    disk, else hashed (and remembered)."""
    from qlora_pipeline.rundir import sha256_file, write_json_atomic

    memo_path = _memo_path()
    small = {p for p in paths if p.stat().st_size < MEMO_MIN_BYTES}
    memo = _load(memo_path) if len(small) < len(set(paths)) else {}
    out, added = {}, False
    for path in paths:
        if path in small:
            out[path] = sha256_file(path)
            continue
        key, ctime_ns = _identity(path)
        digest = memo.get(key)
        if not (isinstance(digest, str) and len(digest) == 64):
            started_ns = _now_ns()
            digest = sha256_file(path)
            settled = started_ns - ctime_ns > RACY_SECONDS * 10**9
            if settled and _identity(path)[0] == key:  # not written to lately, nor while it was read
                memo[key] = digest
                added = True
        out[path] = digest
    if added:
        kept = dict(list(memo.items())[-MAX_ENTRIES:])  # insertion order: the oldest go first
        try:
            write_json_atomic(memo_path, kept)
        except OSError:
            pass  # a read-only or full cache folder: hashed again next time
    return out


def sha256_of(path: Path) -> str:
    return sha256_files([path])[path]

