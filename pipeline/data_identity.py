"""What the data stage's text is, for its fingerprint: the content of its sources.

The recipe names a source (`data.domain.path: corpus/`), not its text. Without the text's
content in the fingerprint, a corpus edited in place (or replaced by another at the same
path) would leave `data`, and everything trained, calibrated and evaluated on it, "up to
date", and the stage cache would hand a run directory the tokens of the old text. So local
files are hashed (sha256 of every file the stage reads: content, not size or mtime, which
`touch -r` or a copy can keep or change at will), and the built-in corpora, which come with
the Python interpreter, are named with its version. Torch-free: `plan` computes it.

Cost: reading the local corpus (about 1 s per GB here) at the first `validate`/`plan`/`run`
after a file changed; the hashes of files of 1 MiB and more are remembered under their
identity on disk (`file_hashes`, as for model files), smaller ones are read every time.
A hub dataset is named by id, config, split, revision and the commit the revision stood for
when `pipeline run` last asked the hub (`hub_dataset_commit`): a branch such as `main` moves
when the dataset is updated, a commit does not, and the data stage loads that very commit, so
the tokens are those of the text the fingerprint names.
"""
from __future__ import annotations

import platform
from pathlib import Path

from qlora_pipeline.models import COMMIT
from qlora_pipeline.recipe import LOCAL_DATA_SUFFIXES


def local_files(path: Path) -> list[Path]:
    """The files the data stage reads for a local source: the file itself, or every file of a
    folder (recursively, sorted) whose suffix is a data format."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_DATA_SUFFIXES)


def content_identity(source) -> dict:
    """{what the text of a `DataSource` is}: file hashes (relative paths), the interpreter's
    version for a built-in corpus, or a hub dataset's commit (`hub_dataset_commit`)."""
    from qlora_pipeline.file_hashes import sha256_files

    if source.builtin is not None:
        # pydoc_data.topics and the standard library's sources change with every Python release.
        return {"builtin": source.builtin, "python": f"{platform.python_implementation()} {platform.python_version()}"}
    if source.path is not None:
        root = Path(source.path).expanduser()
        hashes = sha256_files(local_files(root))
        return {"files": {(p.name if p == root else p.relative_to(root).as_posix()): digest
                          for p, digest in hashes.items()}}
    return {"commit": hub_dataset_commit(source.hub, source.revision)}


REFS_FILE = "hub_dataset_refs.json"
NOT_RESOLVED = "not resolved"


def _refs_path() -> Path:
    from qlora_pipeline.models import cache_root

    return cache_root() / REFS_FILE


def _ref_key(repo: str, revision) -> str:
    return f"{repo}@{revision or 'main'}"


def hub_dataset_commit(repo: str, revision) -> str:
    """The commit hub dataset `repo` at `revision` (default main) stands for, without the
    network: a pinned commit is itself; a branch or tag, the commit `pipeline run` last found it
    at (`resolve_hub_dataset`); NOT_RESOLVED when no run asked the hub for it here."""
    from qlora_pipeline.rundir import read_json

    if revision and COMMIT.fullmatch(revision):
        return revision
    commit = (read_json(_refs_path()) or {}).get(_ref_key(repo, revision))
    return commit if isinstance(commit, str) and COMMIT.fullmatch(commit) else NOT_RESOLVED


def resolve_hub_dataset(repo: str, revision) -> str:
    """Ask the hub which commit `revision` (default main) of dataset `repo` is at now, and
    remember it for `hub_dataset_commit`; `pipeline run` calls it before planning, as it
    downloads a hub model first. Offline (HF_HUB_OFFLINE, no network, an unknown id) the
    commit remembered from an earlier run stands, if any; the data stage then reports what is
    wrong when it loads the dataset."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import HfApi

        commit = HfApi().dataset_info(repo, revision=revision or "main").sha
    except Exception:  # offline, a network error, a gated or unknown dataset: not known now
        commit = None
    if not (isinstance(commit, str) and COMMIT.fullmatch(commit)):
        return hub_dataset_commit(repo, revision)
    _remember(repo, revision, commit)
    return commit


def _remember(repo: str, revision, commit: str) -> None:
    from qlora_pipeline.rundir import read_json, write_json_atomic

    path = _refs_path()
    refs = read_json(path) or {}
    if refs.get(_ref_key(repo, revision)) == commit:
        return
    refs[_ref_key(repo, revision)] = commit
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, refs)
    except OSError:  # an unwritable cache folder: the data stage still loads the commit it was given
        pass


def load_revision(source, identity: dict):
    """The revision the data stage passes to `datasets.load_dataset` for hub source `source`
    whose fingerprint part is `identity`: the commit named there when one is, so the text
    loaded is the text fingerprinted; else the recipe's revision."""
    commit = identity.get("commit")
    return commit if isinstance(commit, str) and COMMIT.fullmatch(commit) else source.revision
