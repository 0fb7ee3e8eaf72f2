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
Hub datasets are named by id, config and split only: their content is not known without
the network (pin a revision by exporting the data to local files when that matters).
"""
from __future__ import annotations

import platform
from pathlib import Path

from qlora_pipeline.recipe import LOCAL_DATA_SUFFIXES


def local_files(path: Path) -> list[Path]:
    """The files the data stage reads for a local source: the file itself, or every file of a
    folder (recursively, sorted) whose suffix is a data format."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_DATA_SUFFIXES)


def content_identity(source) -> dict:
    """{what the text of a `DataSource` is}: file hashes (relative paths), the interpreter's
    version for a built-in corpus, or nothing more than the recipe says for a hub dataset."""
    from qlora_pipeline.file_hashes import sha256_files

    if source.builtin is not None:
        # pydoc_data.topics and the standard library's sources change with every Python release.
        return {"builtin": source.builtin, "python": f"{platform.python_implementation()} {platform.python_version()}"}
    if source.path is not None:
        root = Path(source.path).expanduser()
        hashes = sha256_files(local_files(root))
        return {"files": {(p.name if p == root else p.relative_to(root).as_posix()): digest
                          for p, digest in hashes.items()}}
    return {}
