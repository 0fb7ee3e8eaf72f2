"""Text sources, the train/eval split by document, and tokenization into token streams.

Sources: local files or folders (text, JSON/JSONL, parquet) read through `datasets`, a hub
dataset id, and two offline corpora that ship with CPython itself:
  python-docs    the language reference topics (`pydoc_data.topics`), one document per topic
  python-stdlib  the standard library's own `.py` files, one document per file

The domain split is by document: document i (in source order; topics sorted by key) is
held out when i % holdout_every == 0, so no window of an eval document is ever trained on.
"""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch

from pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".json", ".jsonl")
DOC_SEPARATOR = "\n\n"
_CHUNK_DOCS = 512  # documents tokenized per call; one call for the built-in corpora


def python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def python_stdlib(max_chars: int, seed: int = 0) -> list[str]:
    """Source files of the standard library, in a seeded random order, up to `max_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "__pycache__" not in p.parts
    )
    random.Random(seed).shuffle(files)
    docs, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def _local_documents(path: Path, text_field: str, key: str) -> list[str]:
    import datasets

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    groups: dict[str, list[str]] = {}
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            groups.setdefault("text", []).append(str(f))
        elif f.suffix in JSON_SUFFIXES:
            groups.setdefault("json", []).append(str(f))
        elif f.suffix == ".parquet":
            groups.setdefault("parquet", []).append(str(f))
    docs: list[str] = []
    for builder, data_files in groups.items():
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", **kwargs)
        except Exception as exc:
            raise DataError(f"{key}: cannot read {data_files[0]} as {builder} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None
        field = "text" if builder == "text" else text_field
        if field not in ds.column_names:
            raise DataError(f"{key}.text_field: column '{field}' not in {data_files[0]}; columns: {', '.join(ds.column_names)}")
        docs += [t for t in ds[field] if isinstance(t, str)]
    return docs


def _hub_documents(repo: str, split: str, text_field: str, key: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:
        raise DataError(f"{key}.hub: cannot load '{repo}' split '{split}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); check the id and network, or use a local path") from None
    if text_field not in ds.column_names:
        raise DataError(f"{key}.text_field: column '{text_field}' not in '{repo}'; columns: {', '.join(ds.column_names)}")
    return [t for t in ds[text_field] if isinstance(t, str)]


def load_documents(source, key: str, max_chars: int | None = None) -> list[str]:
    """The non-empty documents of a `DataSource`, in source order.

    Raises:
        DataError: unreadable source or no text at all (message names `key`).
    """
    if source.builtin == "python-docs":
        docs = python_docs()
    elif source.builtin == "python-stdlib":
        docs = python_stdlib(max_chars or 2_000_000)
    elif source.path is not None:
        docs = _local_documents(Path(source.path).expanduser(), source.text_field, key)
    else:
        docs = _hub_documents(source.hub, source.split, source.text_field, key)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{key}: the source holds no text")
    return docs


def split_documents(docs: list[str], holdout_every: int) -> tuple[list[str], list[str]]:
    """(train, eval): document i goes to eval when i % holdout_every == 0.

    A train document whose exact text is also held out is dropped, so no eval text is ever
    trained on (python-docs has one: the topics 'else' and 'if' share their text).
    """
    held = [d for i, d in enumerate(docs) if i % holdout_every == 0]
    held_texts = set(held)
    train = [d for i, d in enumerate(docs) if i % holdout_every != 0 and d not in held_texts]
    return train, held


def tokenize_documents(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """One int64 token stream: documents joined by a blank line, no special tokens.

    Documents are tokenized in chunks of `_CHUNK_DOCS` joined documents (one chunk for small
    corpora, which makes the stream identical to tokenizing the joined text in one call).
    """
    sep = tokenizer(DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    pieces: list[list[int]] = []
    total = 0
    for i in range(0, len(docs), _CHUNK_DOCS):
        ids = tokenizer(DOC_SEPARATOR.join(docs[i : i + _CHUNK_DOCS]), add_special_tokens=False)["input_ids"]
        if pieces:
            pieces.append(sep)
        pieces.append(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = torch.tensor([t for piece in pieces for t in piece], dtype=torch.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


def windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of a token stream; the last partial one is dropped."""
    n = stream.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seq_len].view(n, seq_len)
