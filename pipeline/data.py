"""Text sources, the train/valid/test split by document, decontamination, and tokenization.

Sources: local files or folders (text, JSON/JSONL, parquet) read through `datasets`, a hub
dataset id, and two offline corpora that ship with CPython itself:
  python-docs    the language reference topics (`pydoc_data.topics`), one document per topic
  python-stdlib  the standard library's own `.py` files, one document per file (without
                 `pydoc_data/`, which holds the whole python-docs corpus)

The domain split is by document (in source order; topics sorted by key): document i goes to
the test split `eval` when i % holdout_every == 0; of the rest, the j-th goes to `valid` when
j % valid_every == 0, the others to `train`. Documents nest inside each other (python-docs'
`specialnames` holds `customization` and `attribute-access`, `compound` holds `for`, `while`,
`else`), so a split by document alone leaves held-out text in the training side;
`decontaminate` then cuts every stretch of `min_chars` or more characters that the held-out
text also holds out of the training side (`shared_text`): eval's out of valid and train,
valid's out of train. Held-out documents stay whole.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import re
import sysconfig
import tempfile
import unicodedata
from bisect import bisect_left, bisect_right
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from qlora_pipeline.data_identity import local_files
from qlora_pipeline.errors import DataError
from qlora_pipeline.models import COMMIT
from qlora_pipeline.recipe import JSON_SUFFIXES, PARQUET_SUFFIX, TEXT_SUFFIXES
from qlora_pipeline.shared_text import SharedText, hashed_hits, prefix_hashes

logger = logging.getLogger(__name__)

DOC_SEPARATOR = "\n\n"
_CHUNK_DOCS = 512  # documents tokenized per call; one call for the built-in corpora


def python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, sorted; without installed packages, caches, and
    `pydoc_data/`, which is the python-docs domain corpus itself (the language reference as
    one dict): general text must not contain the domain's test split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "__pycache__", "pydoc_data"} & set(p.relative_to(root).parts))


def python_stdlib(max_chars: int, seed: int = 0) -> list[str]:
    """Source files of the standard library (`stdlib_files`), in a seeded random order, up to
    `max_chars`."""
    files = stdlib_files()
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
    files = local_files(path)  # the files the data stage's fingerprint hashes
    groups: dict[str, list[str]] = {}
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            groups.setdefault("text", []).append(str(f))
        elif f.suffix in JSON_SUFFIXES:
            groups.setdefault("json", []).append(str(f))
        elif f.suffix == PARQUET_SUFFIX:
            groups.setdefault("parquet", []).append(str(f))
    docs: list[str] = []
    for builder, data_files in groups.items():
        field = "text" if builder == "text" else text_field
        docs += _texts(_read_column(builder, data_files, field, key), key,
                       f"{', '.join(data_files[:2])}{' ...' if len(data_files) > 2 else ''}", field)
    return docs


def _read_column(builder: str, data_files: list[str], field: str, key: str) -> list:
    """Column `field` of local files read with `datasets`' `builder`, as a list.

    The files are read as one table, which needs every field of theirs to have one shape:
    files whose other fields differ (a `meta` object with other keys in another file) fail
    so, although only `field` is read; they are then read one at a time, in the same order
    (`_read_files_apart`). So are JSON files whose text field is not text everywhere
    (`_text_everywhere`): where one file's field mixes kinds (`{"text": 5}` beside `{"text":
    "six"}`), `datasets` reads that file's column as JSON values, and a table of several files
    cast them to strings, so the record without text became the text `5` and `six` the text
    `"six"`, quotes included: a file's documents depended on which other files shared its
    folder. (One at a time pays `datasets`' set-up per file, so it is not the rule.)

    Read through a cache of its own, gone afterwards: `datasets` knows a local file in its
    cache by path and mtime, so a file edited in place with its mtime kept (`touch -r`,
    `cp -p`, `rsync -t`) would be read as the text it held before, although the data stage's
    fingerprint (the content) re-ran the stage; and the user's cache would keep a copy of
    every corpus. The column is copied out before the cache goes: `ds[field]` may be a
    lazy view of the cache's Arrow files."""
    import datasets

    if builder == "json" and len(data_files) > 1 and not _text_everywhere(data_files, field):
        return _read_files_apart(builder, data_files, field, key)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    with tempfile.TemporaryDirectory(prefix="qlp-datasets-", ignore_cleanup_errors=True) as cache, _quiet_datasets():
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=cache, **kwargs)
        except Exception as exc:
            if len(data_files) > 1:
                return _read_files_apart(builder, data_files, field, key)
            finder = _PROBLEM_FINDERS.get(builder)
            found = finder(data_files, key) if finder else None
            raise DataError(found or f"{key}: cannot read {data_files[0]} as {builder} ({_reason(exc)})") from None
        if field not in ds.column_names:
            raise _MissingColumn(f"{key}.text_field: column '{field}' not in {data_files[0]}; columns: "
                                 f"{', '.join(ds.column_names)}", ds.num_rows)
        values = list(ds[field])
        del ds  # its memory-mapped files are in the cache about to be removed
    return values


def _text_everywhere(files: list[str], field: str) -> bool:
    """Whether every record of these JSON Lines files has text or nothing (null, absent) under
    `field`, so that one table reads it as `datasets` reads each file; False for a .json file
    (one document of any shape) or a line that does not parse (the reader names it)."""
    for name in files:
        if not name.endswith(".jsonl"):
            return False
        try:
            with open(name, encoding="utf-8-sig") as f:
                for line in f:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    value = record.get(field) if isinstance(record, dict) else None
                    if value is not None and not isinstance(value, str):
                        return False
        except (OSError, ValueError):
            return False
    return True


def _read_files_apart(builder: str, data_files: list[str], field: str, key: str) -> list:
    """Column `field` of each file read on its own (`_read_column`), concatenated; a file
    without the column gives its rows as missing values (skipped with a warning, as in a
    table read at once), and only when no file has it is that an error. A file that cannot
    be read at all is named by `_read_column`."""
    values, without = [], []
    for name in data_files:
        try:
            values += _read_column(builder, [name], field, key)
        except _MissingColumn as exc:
            values += [None] * exc.rows
            without.append(exc)
    if len(without) == len(data_files):
        raise DataError(str(without[0]))
    return values


class _MissingColumn(DataError):
    """A file read on its own has no column `field` (`_read_column`)."""

    def __init__(self, message: str, rows: int):
        super().__init__(message)
        self.rows = rows


@contextmanager
def _quiet_datasets():
    """`datasets` (and pyarrow through it) logs its own errors ("Failed to load JSON ...")
    before it raises; the DataError raised here says what is wrong, by file and line, once.
    Its progress bars go too: for a local folder they said "Downloading data: 3407 files"
    (nothing is downloaded) and "Generating train split" between the stage's own lines."""
    import datasets

    log = logging.getLogger("datasets")
    level, bars = log.level, datasets.is_progress_bar_enabled()
    log.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _reason(exc: Exception) -> str:
    """The exception's type and first line of message (200 characters at most), for an error
    message; the type alone when the message is empty (`datasets` raises a bare
    StopIteration for an empty JSON Lines file)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _texts(values: list, key: str, where: str, field: str) -> list[str]:
    """The string values of a text column; records whose value is missing (null) or not a
    string are skipped with a warning that counts them: a field that half the records spell
    differently should not pass unnoticed."""
    texts = [t for t in values if isinstance(t, str)]
    if len(texts) < len(values):
        logger.warning("%s: %d of %d records in %s have no text under '%s' (null or not a string); skipped",
                       key, len(values) - len(texts), len(values), where, field)
    return texts


def _text_problem(files: list[str], key: str) -> str | None:
    """The first text file that is not UTF-8 (by file and byte offset) or holds NUL bytes:
    `datasets` says only that generating the dataset failed, and preflight reads only the
    start of each file."""
    import codecs

    for name in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        try:
            with open(name, "rb") as f:
                while chunk := f.read(1 << 20):
                    if b"\0" in chunk:
                        return (f"{key}.path: {name} holds NUL bytes at byte {offset + chunk.index(0)}: not text; "
                                "remove it from the folder, or give text files only")
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as exc:
                        return (f"{key}.path: {name} is not UTF-8 text (byte {offset + exc.start}); convert it "
                                "(e.g. iconv -f latin1 -t utf-8) or remove it")
                    offset += len(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"{key}.path: {name} is not UTF-8 text (it ends inside a character); convert it or remove it"
        except OSError as exc:
            return f"{key}.path: cannot read {name} ({exc}); fix it or remove it"
    return None


def _json_problem(files: list[str], key: str) -> str | None:
    """The first line that is not JSON in JSON Lines files (or a .json file that does not parse),
    by file and line, or the first file without a record: `datasets` says only that
    generating the dataset failed, or nothing at all."""
    for name in files:
        f = Path(name)
        try:
            text = f.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            return f"{key}.path: cannot read {f} ({exc}); fix it or remove it"
        empty = f"{key}.path: {f} holds no JSON record (it is empty); remove it or fill it"
        if f.suffix == ".json":
            try:
                content = json.loads(text)
            except json.JSONDecodeError as exc:
                return (f"{key}.path: {f} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        "fix it or remove it")
            if content in ([], {}):
                return empty
            continue
        if not text.strip():  # `datasets` raises a bare StopIteration
            return empty
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                return (f"{key}.path: {f}: line {number} is not valid JSON ({exc.msg}, column {exc.colno}); fix "
                        "or delete that line (JSON Lines: one object per line)")
            if not isinstance(record, dict):
                return (f"{key}.path: {f}: line {number} is a JSON {type(record).__name__}, not an object; JSON "
                        "Lines holds one object per line")
            if _lone_surrogate(record):
                return (f"{key}.path: {f}: line {number} holds a lone surrogate escape (\\ud800-\\udfff without "
                        "its pair), which is no character; fix or delete that line")
    return None


def _lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a string with a lone surrogate (JSON's \\ud800 escape
    without its pair parses, but is no character and cannot be written as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(v) for v in value.values())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def _parquet_problem(files: list[str], key: str) -> str | None:
    """The first parquet file without a row (`datasets` says only that generating the dataset
    failed)."""
    import pyarrow.parquet as pq

    for name in files:
        try:
            rows = pq.read_metadata(name).num_rows
        except Exception:  # not parquet: named by the caller's generic message
            continue
        if rows == 0:
            return f"{key}.path: {name} holds no rows; remove it or fill it"
    return None


# What names the problem of a local file `datasets` could not read, by builder.
_PROBLEM_FINDERS = {"json": _json_problem, "text": _text_problem, "parquet": _parquet_problem}


def _hub_documents(repo: str, split: str, text_field: str, key: str, config: str | None = None,
                   revision: str | None = None) -> list[str]:
    import datasets

    # Said first: unreachable, the hub client retries quietly for about half a minute.
    logger.info("%s.hub: loading '%s' split '%s' from the Hugging Face Hub (or its local cache)", key, repo, split)
    try:
        ds = datasets.load_dataset(repo, config, split=split, revision=revision)
    except Exception as exc:
        what = f"'{repo}'" + (f" config '{config}'" if config else "") + (f" at {revision}" if revision else "")
        raise DataError(f"{key}.hub: cannot load {what} split '{split}' ({_reason(exc)}); check the id and "
                        "network, or use a local path") from None
    loaded = _cached_commit(ds)
    if revision and COMMIT.fullmatch(revision) and loaded not in (None, revision):
        # Offline, `datasets` loads the newest cached copy of the dataset whatever the revision.
        raise DataError(f"{key}.hub: '{repo}' at commit {revision} (the one this stage's settings name) is not in "
                        f"the local cache, which holds {loaded}; connect to the hub once to fetch it, or set "
                        f"{key}.revision to {loaded}")
    if text_field not in ds.column_names:
        raise DataError(f"{key}.text_field: column '{text_field}' not in '{repo}'; columns: {', '.join(ds.column_names)}")
    return _texts(ds[text_field], key, f"'{repo}'", text_field)



def _cached_commit(ds) -> str | None:
    """The commit of a hub dataset `datasets` loaded, read from its cache folder
    (`<name>/<config>/<version>/<commit>/`), or None where the path holds none."""
    for entry in getattr(ds, "cache_files", None) or ():
        for part in reversed(Path(entry.get("filename", "")).parts):
            if COMMIT.fullmatch(part):
                return part
    return None


def load_documents(source, key: str, max_chars: int | None = None, revision: str | None = None) -> list[str]:
    """The non-empty documents of a `DataSource`, in source order, in `canonical` form; a hub
    dataset at `revision` (the commit its fingerprint names), else at the recipe's.

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
        docs = _hub_documents(source.hub, source.split, source.text_field, key, source.config,
                              revision or source.revision)
    docs = [canonical(d) for d in docs if d.strip()]
    if source.document_chars is not None:
        docs = [piece for d in docs for piece in split_long_document(d, source.document_chars)]
    if not docs:
        field = "" if source.builtin else f" (for JSON, parquet and hub data: no record has text under " \
                                           f"'{source.text_field}')"
        raise DataError(f"{key}: the source holds no text: every document is empty or whitespace{field}; give a "
                        "source with text, or set its text_field")
    return docs


def split_long_document(text: str, min_chars: int) -> list[str]:
    """`text` cut into consecutive pieces of at least `min_chars` characters, each ending at the
    first paragraph break (blank line) after that many; where there is none within
    2 * `min_chars` characters of the piece's start (text without blank lines, or with only
    one after a title), at the first line break after `min_chars`. The breaks at the cuts
    are dropped; the last piece holds what is left (it may be shorter). Text with no break
    after `min_chars` stays one piece."""
    cuts = _Breaks(text)
    pieces, start = [], 0
    while (cut := cuts.next_cut(start, min_chars)) is not None:
        pieces.append(text[start : cut[0]])
        start = cut[1]
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


class _Breaks:
    """The paragraph breaks and line breaks of a text, and where `split_long_document` cuts."""

    def __init__(self, text: str):
        self.paragraphs = [m.span() for m in _BLANK_LINE.finditer(text)]
        self.paragraph_starts = [a for a, _ in self.paragraphs]
        self.lines = [m.start() for m in re.finditer("\n", text)]

    def next_cut(self, start: int, min_chars: int) -> tuple[int, int] | None:
        """(start, end) of the break that ends the piece starting at `start`, or None."""
        after = start + min_chars
        i = bisect_left(self.paragraph_starts, after)
        if i < len(self.paragraphs) and self.paragraph_starts[i] <= start + 2 * min_chars:
            return self.paragraphs[i]
        for j in range(bisect_left(self.lines, after), len(self.lines)):
            line = self.lines[j]
            k = bisect_right(self.paragraph_starts, line) - 1  # the paragraph break at or before it
            if k >= 0 and self.paragraph_starts[k] == line:
                return self.paragraphs[k]  # a line break that starts a paragraph break: cut at all of it
            if k >= 0 and line < self.paragraphs[k][1]:
                continue  # inside a paragraph break begun before `after`: a cut would leave a blank line
            return line, line + 1
        return None


@dataclass(frozen=True)
class Splits:
    """The domain documents by split: `train` is trained on, `valid` steers training and the
    merge (eval loss, `merge.into: auto`), `eval` is the test split reported at the end."""

    train: list[str]
    valid: list[str]
    eval: list[str]
    # The general text evaluated for forgetting (`general_eval`'s documents), when there is
    # one: held out like `eval`, so its passages are cut from train and valid too.
    general_eval: list[str] = field(default_factory=list)


def split_documents(docs: list[str], holdout_every: int, valid_every: int) -> Splits:
    """Document i goes to eval when i % holdout_every == 0; of the remaining documents, in
    order, the j-th goes to valid when j % valid_every == 0, the others to train.

    A train or valid document whose exact text is also held out (in eval, or for train also
    in valid) is dropped: python-docs has one, the topics 'else' and 'if' share their text.
    Any split may come out empty; the caller decides whether that is an error.
    """
    held = [d for i, d in enumerate(docs) if i % holdout_every == 0]
    rest = [d for i, d in enumerate(docs) if i % holdout_every != 0]
    eval_texts = set(held)
    valid = [d for j, d in enumerate(rest) if j % valid_every == 0 and d not in eval_texts]
    held_texts = eval_texts | set(valid)  # once: per document it cost a copy of both sets
    train = [d for j, d in enumerate(rest) if j % valid_every != 0 and d not in held_texts]
    return Splits(train=train, valid=valid, eval=held)


# ---------------------------------------------------------------- decontamination
# What is cut: every stretch of at least min_chars characters of the training side's normalized
# text that the held-out side's also holds (`remove_contained`, `shared_text`). What is
# reported besides, as earlier versions measured it (`overlap`): held-out paragraphs found.
# A paragraph is the text between blank lines, whitespace-normalized (every run of
# whitespace one space, stripped). "Held-out paragraph p appears in side S" means p is a
# substring of S's normalized text, documents joined as the token stream joins them, so a
# match inside a larger paragraph, across a paragraph break, or across two documents counts.
# A paragraph of several lines is also searched for by its runs of lines (`_line_runs`): text
# without blank lines is one paragraph, and a copy of part of it must be found as well.

_BLANK_LINE = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\S+")
_ANCHOR_WORDS = 3  # words of a held-out paragraph that index it (see _NormalizedSide.find_all)
# (name, held-out split, training-side split): the pairs checked and recorded.
PAIRS = (("eval_in_train", "eval", "train"), ("eval_in_valid", "eval", "valid"), ("valid_in_train", "valid", "train"),
         ("general_eval_in_train", "general_eval", "train"), ("general_eval_in_valid", "general_eval", "valid"))
# The order in which sides are cleaned: valid first, so train is cleaned against the valid
# text that will actually ship.
_CLEANING_ORDER = ("eval_in_valid", "general_eval_in_valid", "eval_in_train", "general_eval_in_train",
                   "valid_in_train")
_SPLIT_NAMES = ("train", "valid", "eval", "general_eval")


BOM = "\ufeff"
# Python's str.lower() makes a capital sigma final (ς) or not (σ) by the letters around it, so
# the same word would fold differently at the end of a paragraph than inside a longer one.
# One character for one, so positions still map (`_NormalizedSide.locate`): every sigma to σ
# (see `fold_case`), and typographic quotes, dashes and the minus sign to their ASCII forms,
# which an editor or a converter swaps either way when text is copied.
_ONE_FOR_ONE = str.maketrans({"ς": "σ", **dict.fromkeys("‘’‚‛′", "'"), **dict.fromkeys("“”„‟″", '"'),
                              **dict.fromkeys("‐‑‒–—―−", "-")})
_UNICODE_BREAKS = str.maketrans({BOM: None, "\u2029": "\n\n", "\u2028": "\n", "\x85": "\n"})
# Format characters that show nothing: the soft hyphen (U+00AD), the Arabic letter mark
# (U+061C), the Mongolian vowel separator (U+180E), zero-width space, non-joiner and joiner and
# the left-to-right and right-to-left marks (U+200B-U+200F), the bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069), the word joiner and invisible
# operators (U+2060-U+2064), the deprecated format characters (U+206A-U+206F) and the tag
# characters (U+E0001, U+E0020-U+E007F). Compared without them (`normalize`), since a copy
# with some slipped into its words reads the same; the documents themselves keep them (a
# joiner carries meaning in some scripts and emoji).
_INVISIBLE_CHARS = ("\u00ad\u061c\u180e" + "".join(map(chr, range(0x200B, 0x2010))) + "".join(map(chr, range(0x202A, 0x202F)))
                    + "".join(map(chr, range(0x2060, 0x2065))) + "".join(map(chr, range(0x2066, 0x2070)))
                    + "\U000e0001" + "".join(map(chr, range(0xE0020, 0xE0080))))
_INVISIBLE = str.maketrans(dict.fromkeys(_INVISIBLE_CHARS))
# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Chinese, Japanese;
# with the CJK punctuation and fullwidth forms): a line break between two of their characters is
# no word break, and a copy re-wrapped elsewhere breaks its lines at other characters. Where the
# characters on both sides of a run of whitespace are of these scripts, the normalized text
# joins them without a space (`_join`).
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3000-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
                       "\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]")


def _visible(word: str) -> str:
    return word if word.isascii() else word.translate(_INVISIBLE)


# A reply quotes what it answers with `>` before every line (Markdown's block quote, mail,
# forums; nested as `>>` or `> >`), so a held-out paragraph quoted in a training document, its
# lines re-wrapped, reads otherwise to the comparison on every line. Decontamination compares
# the texts a second time with these markers blanked (`unquoted`).
_QUOTE_MARKERS = re.compile(r"^[ \t]*>(?:[ \t]*>)*", re.MULTILINE)


def unquoted(text: str) -> str:
    """`text` with the quote markers that start its lines (`>`, `>>`, `> >`, after any
    indentation) blanked: spaces of the same length, so that every other character keeps its
    position. A doctest's `>>>` prompt is such a marker too: code copied with or without its
    prompts is the same code to this comparison."""
    return _QUOTE_MARKERS.sub(lambda m: " " * len(m.group()), text) if ">" in text else text


def has_quote_markers(docs: list[str]) -> bool:
    """Whether any line of `docs` starts with a quote marker (`unquoted` changes something)."""
    return any(">" in d and _QUOTE_MARKERS.search(d) for d in docs)


def canonical(text: str) -> str:
    """`text` in NFC Unicode form with `\\n` line endings and without byte order marks
    (U+FEFF). The same words in NFD (macOS file names, some editors), with CRLF or lone-CR
    line endings (a lone CR is no blank line to `_BLANK_LINE`), or behind the BOM a Windows
    editor writes at the start of a file (or that concatenated files carry inside the text)
    would otherwise be different text to every comparison below, and a held-out paragraph
    would survive in a training document that only differs so. Unicode's own breaks become
    what they mean here: a paragraph separator (U+2029) a blank line, a line separator
    (U+2028) or NEL (U+0085) a line break. Documents are read in this
    form (`load_documents`), and every comparison applies it again, so a caller passing
    other text is not fooled either."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        return text
    return unicodedata.normalize("NFC", text.translate(_UNICODE_BREAKS))


def fold_case(text: str) -> str:
    """`text` in lower case, character for character and whatever surrounds each character:
    a held-out paragraph is folded on its own, the training text it hides in as a whole, and
    both must fold a copy alike. So every sigma (Σ, σ, ς) becomes σ (and typographic quotes and
    dashes their ASCII forms: `_ONE_FOR_ONE`), and a character whose lower case is longer than
    one character (Turkish dotted I) keeps its case, so every position still maps to the
    original text's (what `_NormalizedSide.locate` relies on)."""
    low = text.lower()
    if len(low) != len(text):  # some character's lower case is longer: fold one by one
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    return low.translate(_ONE_FOR_ONE) if not low.isascii() else low


def _gap(left: str, right: str) -> str:
    """What the normalized text puts between words (or lines, paragraphs) `left` and `right`:
    one space, or nothing between two characters of a script without spaces (`_UNSPACED`)."""
    if left[-1].isascii() or right[0].isascii():
        return " "
    return "" if _UNSPACED.match(left[-1]) and _UNSPACED.match(right[0]) else " "


def _join(parts: list[str]) -> str:
    """Normalized, non-empty `parts` joined as `normalize` joins words (`_gap`)."""
    if not parts:
        return ""
    out = [parts[0]]
    for left, right in zip(parts, parts[1:]):
        out += (_gap(left, right), right)
    return "".join(out)


def normalize(text: str) -> str:
    """Runs of whitespace become one space (none between two characters of a script written
    without spaces: `_gap`); leading and trailing whitespace goes; letters are compared in
    lower case (a held-out paragraph copied with its case changed, a heading upper-cased, is
    the same text to the model); characters that show nothing go (`_INVISIBLE`)."""
    words = [w for w in map(_visible, _WORD.findall(fold_case(text))) if w]
    return " ".join(words) if text.isascii() else _join(words)


@dataclass(frozen=True)
class Passage:
    """A checked passage of a text (`checked_passages`): `text` normalized, and `runs`, the
    (start, end) in `text` of its runs of consecutive lines (`_line_runs`), when it is a
    paragraph of several lines."""

    text: str
    runs: tuple[tuple[int, int], ...] = ()

    def run_texts(self) -> list[str]:
        return [self.text[a:b] for a, b in self.runs]


def checked_passages(text: str, min_chars: int) -> list[Passage]:
    """The passages of `text` that are checked, in order: every paragraph with at least
    `min_chars` characters, and each run of shorter paragraphs between them joined (one space
    between them, as the normalized text of a training side joins paragraphs) into pieces of
    at least `min_chars` characters (`_pieces`). A paragraph of several lines carries its
    runs of consecutive lines of at least `min_chars` characters too (`_line_runs`).

    A lone short paragraph (a heading, "Changed in version 3.x.") recurs legitimately and is
    not checked; but a held-out document made only of short paragraphs (verse, a list, code
    between blank lines) copied into a training document must be found like any other text,
    and so must part of a paragraph without blank lines (one sentence per line, a log, code,
    a whole file without a blank line) copied into a longer one.
    """
    out: list[Passage] = []
    run: list[str] = []  # consecutive paragraphs shorter than min_chars
    for raw in _BLANK_LINE.split(canonical(text)):
        p = normalize(raw)
        if not p:
            continue
        if len(p) < min_chars:
            run.append(p)
            continue
        out += [Passage(piece) for piece in _pieces(run, min_chars)]
        run = []
        out.append(Passage(p, _line_runs(raw, p, min_chars)))
    return out + [Passage(piece) for piece in _pieces(run, min_chars)]


def paragraphs(text: str, min_chars: int) -> list[str]:
    """The normalized text of every checked passage of `text` (`checked_passages`): the unit
    `overlap` counts."""
    return [p.text for p in checked_passages(text, min_chars)]


def searched(text: str, min_chars: int) -> list[str]:
    """What is searched for of `text`: its checked passages and their runs of lines."""
    return [needle for p in checked_passages(text, min_chars) for needle in (p.text, *p.run_texts())]


def _line_runs(raw: str, whole: str, min_chars: int) -> tuple[tuple[int, int], ...]:
    """(start, end) in `whole` (paragraph `raw`, normalized) of its lines grouped as `_pieces`
    groups short paragraphs: consecutive runs of at least `min_chars` characters, the last
    reaching back. A copy of some of the lines holds the runs between its first and last
    line whole, however it wraps them: only less than two runs' worth at either edge of a
    copy can stay unfound. None (empty) for a paragraph of one line, or of one run."""
    lines = [line for line in map(normalize, raw.split("\n")) if line]
    starts, pos = [], 0  # where each line starts in whole (normalized lines join as words do: `_gap`)
    for i, line in enumerate(lines):
        pos += len(_gap(lines[i - 1], line)) if i else 0
        starts.append(pos)
        pos += len(line)
    runs = tuple((starts[a], starts[b - 1] + len(lines[b - 1])) for a, b in _piece_bounds(lines, min_chars))
    return () if runs == ((0, len(whole)),) else runs


def _pieces(run: list[str], min_chars: int) -> list[str]:
    """A run of short paragraphs, joined, in consecutive pieces of at least `min_chars`
    characters (`_piece_bounds`). A run shorter than `min_chars` in all gives none."""
    return [_join(run[a:b]) for a, b in _piece_bounds(run, min_chars)]


def _piece_bounds(run: list[str], min_chars: int) -> list[tuple[int, int]]:
    """[a, b) of the items of `run` in each consecutive piece whose items, joined with one
    space, have at least `min_chars` characters; the remainder after the last one becomes a
    piece of its own by reaching back into the run (overlapping the one before), so that
    every part of the run is in a piece that a copy of that part can hold."""
    ends = [0]  # ends[i]: characters in run[:i], for the length of any joined stretch at once
    for item in run:
        ends.append(ends[-1] + len(item))

    def joined(a: int, b: int) -> int:
        return ends[b] - ends[a] + (b - a - 1)

    bounds, start = [], 0
    for end in range(1, len(run) + 1):
        if joined(start, end) >= min_chars:
            bounds.append((start, end))
            start = end
    if bounds and start < len(run):
        back = start
        while joined(back, len(run)) < min_chars:
            back -= 1
        bounds.append((back, len(run)))
    return bounds


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) in `text` of every paragraph (blank-line separators excluded)."""
    spans, pos = [], 0
    for m in _BLANK_LINE.finditer(text):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, len(text)))
    return spans


class _NormalizedSide:
    """The normalized text of a list of documents joined as one, as the token stream's blank
    line between documents normalizes (`_join`: one space, none between two characters of a
    script without spaces; a document without visible text adds nothing), and the way back
    from a position in it to (document, position in the original document)."""

    def __init__(self, docs: list[str], unquote: bool = False):
        """With `unquote`, the documents are compared `unquoted` (positions still refer to the
        documents as they are: blanking keeps every position)."""
        self.docs = [canonical(d) for d in docs]  # positions refer to these
        self._compared = [unquoted(d) for d in self.docs] if unquote else self.docs
        normalized = [normalize(d) for d in self._compared]
        self.starts, pos, last = [], 0, ""
        for n in normalized:
            if n and last:
                pos += len(_gap(last, n))
            self.starts.append(pos)  # an empty document starts where the next one does
            pos += len(n)
            last = n or last
        self.text = _join([n for n in normalized if n])
        self._word_starts: dict[int, tuple[list[int], list[int]]] = {}

    def locate(self, q: int) -> tuple[int, int]:
        """(document, original position) of normalized position `q`, which must not be a
        space: every normalized character but a space comes from one original character."""
        d = bisect_right(self.starts, q) - 1
        if d not in self._word_starts:  # built lazily: only documents with a match need it
            words, norm_starts, k, last = [], [], 0, ""
            for w in _WORD.finditer(self._compared[d]):
                visible = _visible(fold_case(w.group()))
                if visible:  # a word of invisible characters only is no word of the normalized text
                    k += len(_gap(last, visible)) if last else 0
                    words.append(w)
                    norm_starts.append(k)
                    k += len(visible)
                    last = visible
            self._word_starts[d] = (norm_starts, words)
        norm_starts, words = self._word_starts[d]
        r = q - self.starts[d]
        w = bisect_right(norm_starts, r) - 1
        return d, words[w].start() + _original_offset(words[w].group(), r - norm_starts[w])

    def find_all(self, needles: set[str]) -> list[tuple[int, int]]:
        """(start, end) of every occurrence of every needle (normalized, non-empty).

        In one pass over the text's words rather than one search per needle: a needle of
        `_ANCHOR_WORDS` + 2 words or more is looked up by its 2nd to (`_ANCHOR_WORDS`+1)-th
        words, which every occurrence holds as whole words of the text (only a needle's first
        and last word may sit inside a longer word of the text), and each hit is confirmed by
        comparing the text. Shorter needles (few, long words: rulers, long code lines, URLs)
        by the hashes of their first characters (`prefix_matches`): a search per needle costs
        a pass over the whole text, and code corpora hold thousands of such needles.
        """
        anchored: dict[str, list[str]] = {}
        short: list[str] = []
        for needle in needles:
            words = needle.split(" ")
            if len(words) >= _ANCHOR_WORDS + 2:
                anchored.setdefault(" ".join(words[1 : _ANCHOR_WORDS + 1]), []).append(needle)
            else:
                short.append(needle)
        found = prefix_matches(self.text, short)
        heads = {key.split(" ", 1)[0] for key in anchored}
        text = self.text
        for word in _WORD.finditer(text):
            if word.group() not in heads:
                continue
            end = word.end()
            for _ in range(_ANCHOR_WORDS - 1):
                end = text.find(" ", end + 1)
                if end < 0:
                    end = len(text)
                    break
            for needle in anchored.get(text[word.start() : end], ()):
                start = word.start() - 1 - needle.index(" ")
                if start >= 0 and text.startswith(needle, start):
                    found.append((start, start + len(needle)))
        return found

    def original_spans(self, start: int, end: int) -> dict[int, tuple[int, int]]:
        """The original text behind normalized [start, end), per document (a match that
        crosses a document boundary takes the end of one and the start of the next). Spaces
        at either end, which no original character stands behind, are left out."""
        while start < end and self.text[start] == " ":
            start += 1
        while end > start and self.text[end - 1] == " ":
            end -= 1
        if start == end:
            return {}
        (d0, p0), (d1, p1) = self.locate(start), self.locate(end - 1)
        if d0 == d1:
            return {d0: (p0, p1 + 1)}
        spans = {d0: (p0, len(self.docs[d0])), d1: (0, p1 + 1)}
        spans.update({d: (0, len(self.docs[d])) for d in range(d0 + 1, d1)})
        return spans


_PREFIX_CHARS = 32  # characters of a needle's start hashed by `prefix_matches`


def prefix_matches(text: str, needles: list[str]) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of every needle in `text`, overlapping ones included,
    in one pass over `text`: each position's hash of the next k characters (k: the shortest
    needle's length, at most `_PREFIX_CHARS`) is looked up among the needles' hashes of their
    first k characters (`shared_text.prefix_hashes`), and each hit is confirmed by comparing
    the text."""
    needles = [n for n in needles if n]
    if not needles or not text:
        return []
    k = min(_PREFIX_CHARS, min(map(len, needles)))
    # hash of the first k characters -> length -> the needles of that length: needles alike in
    # their start (a code corpus's ruler comments) cost one lookup per length at a hit, not one
    # comparison each
    by_hash: dict[int, dict[int, set[str]]] = {}
    for needle, h in zip(needles, prefix_hashes(needles, k)):
        by_hash.setdefault(h, {}).setdefault(len(needle), set()).add(needle)
    wanted = np.array(sorted(by_hash), dtype=np.uint64)
    found = []
    for q, h in hashed_hits(text, k, wanted):
        found += [(q, q + length) for length, alike in by_hash[h].items() if text[q : q + length] in alike]
    return found


def _original_offset(word: str, visible_offset: int) -> int:
    """Where in `word` its `visible_offset`-th visible character (`_INVISIBLE`) is."""
    if _visible(word) == word:
        return visible_offset
    seen = -1
    for i, c in enumerate(word):
        if c.translate(_INVISIBLE):
            seen += 1
            if seen == visible_offset:
                return i
    raise ValueError(f"{word!r} has no visible character {visible_offset}")


@dataclass(frozen=True)
class Overlap:
    """Held-out paragraphs (checked passages: `paragraphs`) found in the training side, whole
    or some of their runs of lines, and the characters found of them; `fraction` is those
    characters over all the held-out side's checked characters."""

    paragraphs: int
    chars: int
    checked_paragraphs: int
    checked_chars: int

    @property
    def fraction(self) -> float:
        return self.chars / self.checked_chars if self.checked_chars else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"paragraphs": self.paragraphs, "chars": self.chars, "fraction": round(self.fraction, 6),
                "checked_paragraphs": self.checked_paragraphs, "checked_chars": self.checked_chars}


def overlap(held: list[str], side: list[str], min_chars: int) -> Overlap:
    """How much of `held` appears verbatim in `side`: every held-out paragraph of at least
    `min_chars` characters (repeats counted each time) that is, or some of whose runs of
    lines are, a substring of `side`'s normalized text; of a paragraph found in part, the
    characters of the runs found count."""
    view = _NormalizedSide(side)
    checked = [p for d in held for p in checked_passages(d, min_chars)]
    present = {view.text[a:b] for a, b in view.find_all({t for p in checked for t in (p.text, *p.run_texts())})}
    found = [n for n in (_chars_found(p, present) for p in checked) if n]
    return Overlap(len(found), sum(found), len(checked), sum(len(p.text) for p in checked))


def _chars_found(passage: Passage, present: set[str]) -> int:
    """How many characters of `passage` are in `present`: all when it is, else those of its
    runs of lines that are (runs overlap at a paragraph's end: counted once)."""
    if passage.text in present:
        return len(passage.text)
    covered: set[int] = set()
    for a, b in passage.runs:
        if passage.text[a:b] in present:
            covered.update(range(a, b))
    return len(covered)


def measure_overlap(splits: Splits, min_chars: int) -> dict[str, Overlap]:
    """`overlap` for every pair of `PAIRS`."""
    return {name: overlap(getattr(splits, held), getattr(splits, side), min_chars) for name, held, side in PAIRS}


def _cut(docs: list[str], spans: dict[int, list[tuple[int, int]]]) -> list[str]:
    """`docs` with the given original spans removed, each replaced by a paragraph break (so
    the text around a cut is not glued into one new paragraph); documents left without text
    are dropped."""
    out = []
    for d, text in enumerate(docs):
        merged: list[list[int]] = []
        for a, b in sorted(spans.get(d, ())):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in reversed(merged):
            text = text[:a].rstrip() + "\n\n" + text[b:].lstrip()
        if merged:
            text = text.strip()
        if text.strip():
            out.append(text)
    return out


def remove_contained(side: list[str], held: list[str], min_chars: int,
                     index: SharedText | None = None, unquote: bool = False) -> tuple[list[str], int]:
    """`side` with every stretch of at least `min_chars` characters that the held-out text also
    holds (both normalized: `shared_spans`) cut out, repeated until none is left (a cut can,
    in principle, join text into a new one), and the characters removed (of the normalized
    text). Only the shared text goes, not the rest of its paragraph.

    That covers a held-out paragraph inside a training one, across a paragraph or document
    boundary, part of one (a long one-line paragraph quoted with its last words edited, or
    split between two training documents mid-word), and the other way round a training
    document that is part of a held-out paragraph.

    Cost: one pass of hashing over the training side per round (`shared_text`), after one
    index of the held-out side (`index`: `held_index(held, min_chars, unquote)` made before,
    reused). With `unquote`, both sides are compared `unquoted`.
    """
    index = index if index is not None else held_index(held, min_chars, unquote)
    return _cut_until_gone(side, lambda view: index.spans(view.text), unquote)


def remove_found(side: list[str], held: list[str], min_chars: int) -> tuple[list[str], int]:
    """`side` with every occurrence of a held-out passage (`searched`: what `overlap` finds)
    cut out, repeated until none is left, and the characters removed (normalized).

    `remove_contained`'s index keeps a k-gram repeated more than `shared_text._MAX_POSITIONS`
    times at some of its copies only, so a held-out passage built of much-repeated pieces (a
    ruler comment of dashes ending in a name, hundreds of them in a code corpus) can escape
    it; the check after cleaning (`overlap`) searches the passages verbatim and refused such
    a corpus. `decontaminate` cuts what the check finds with this, so cleaning never leaves
    what the check refuses."""
    needles = {t for d in held for t in searched(d, min_chars)}
    return _cut_until_gone(side, lambda view: view.find_all(needles))


def _cut_until_gone(side: list[str], find, unquote: bool = False) -> tuple[list[str], int]:
    """`side` with the original text behind every span of its normalized text that
    `find(view)` gives (`view`: its `_NormalizedSide`, `unquoted` with `unquote`) cut out,
    repeated until it gives none (a cut can, in principle, join text into a new match)."""
    removed, view = 0, _NormalizedSide(side, unquote)
    while True:
        spans: dict[int, list[tuple[int, int]]] = {}
        for start, end in find(view):
            for d, span in view.original_spans(start, end).items():
                spans.setdefault(d, []).append(span)
        if not spans:  # nothing found, or only spaces (no original text behind them)
            return view.docs, removed
        cut = _NormalizedSide(_cut(view.docs, spans), unquote)
        removed += len(view.text) - len(cut.text)
        view = cut


def held_index(held: list[str], min_chars: int, unquote: bool = False) -> SharedText:
    """The held-out documents' normalized text, indexed (`SharedText`) with where each of
    their lines starts; documents joined as their token stream joins them (a blank line,
    normalized: `_join`): an evaluation window runs from the end of one held-out document
    into the next, so a training copy of that junction is shared text too. A stretch that
    runs on into the next document by chance (a "The" that starts both) is trimmed as at
    any line's edge. With `unquote`, the documents `unquoted`."""
    form = (lambda d: unquoted(canonical(d))) if unquote else canonical
    lines = [line for d in held for line in map(normalize, form(d).split("\n")) if line]
    starts, pos = [], 0
    for i, line in enumerate(lines):  # lines and documents alike joined as `normalize` joins words
        pos += len(_gap(lines[i - 1], line)) if i else 0
        starts.append(pos)
        pos += len(line)
    return SharedText(_join(lines), min_chars, starts)


def shared_chars(held: list[str], side: list[str], min_chars: int, unquote: bool = False,
                 index: SharedText | None = None) -> int:
    """Characters of `side`'s normalized text in stretches of at least `min_chars` characters
    that `held`'s also holds, whole (`remove_contained` cuts them less the chance matches at
    their edges); 0 once it has cut. With `unquote`, both compared `unquoted` (`index`:
    `held_index(held, min_chars, unquote)` made before, reused)."""
    index = index if index is not None else held_index(held, min_chars, unquote)
    covered, end = 0, 0
    for a, b in index.spans(_NormalizedSide(side, unquote).text, trim=False):
        covered += max(0, b - max(a, end))
        end = max(end, b)
    return covered


def _shingles(paragraph: str, words: int) -> set[str]:
    """Word n-grams of a normalized paragraph (the whole paragraph if it is shorter)."""
    tokens = paragraph.split(" ")
    return {" ".join(tokens[i : i + words]) for i in range(max(1, len(tokens) - words + 1))}


def _minhashes(shingle_sets: list[set[str]], num_perm: int) -> list:
    from datasketch import MinHash

    return MinHash.bulk([[s.encode() for s in sorted(sh)] for sh in shingle_sets], num_perm=num_perm, seed=1)


NUM_PERM = 128  # MinHash permutations: datasketch's default, Jaccard estimates to about +-0.09
# LSH looks for candidates this far below the threshold: its recall drops steeply near its own
# threshold, and each candidate's exact Jaccard decides anyway.
LSH_MARGIN = 0.1


def remove_near_duplicates(side: list[str], held: list[str], min_chars: int, threshold: float,
                           shingle_words: int) -> tuple[list[str], int]:
    """`side` without its paragraphs (>= min_chars) whose word-shingle Jaccard similarity to
    some held-out paragraph is at least `threshold`, and how many were removed.

    Candidates come from datasketch's MinHashLSH (sublinear in the held-out side, for large
    corpora), queried below the threshold; each candidate's exact Jaccard similarity decides,
    so only LSH's recall, not the sketch's estimation error, shapes the result.
    """
    from datasketch import MinHashLSH

    side = [canonical(d) for d in side]
    held_paragraphs = sorted({p for d in held for p in paragraphs(d, min_chars)})
    if not held_paragraphs or not side:
        return side, 0
    held_shingles = [_shingles(p, shingle_words) for p in held_paragraphs]
    lsh = MinHashLSH(threshold=max(0.05, threshold - LSH_MARGIN), num_perm=NUM_PERM)
    for i, m in enumerate(_minhashes(held_shingles, NUM_PERM)):
        lsh.insert(i, m)
    candidates = [(d, span, _shingles(normalize(text[span[0]:span[1]]), shingle_words))
                  for d, text in enumerate(side) for span in _paragraph_spans(text)
                  if len(normalize(text[span[0]:span[1]])) >= min_chars]
    spans: dict[int, list[tuple[int, int]]] = {}
    for (d, span, shingles), m in zip(candidates, _minhashes([c[2] for c in candidates], NUM_PERM)):
        if any(_jaccard(shingles, held_shingles[i]) >= threshold for i in lsh.query(m)):
            spans.setdefault(d, []).append(span)
    return (_cut(side, spans), sum(map(len, spans.values()))) if spans else (side, 0)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


@dataclass(frozen=True)
class Decontamination:
    """What `decontaminate` did: per pair, the held-out paragraphs found before and after
    (`overlap`), the training-side characters shared with the held-out text in stretches of
    `min_chars` or more before (`shared_chars`, the plain comparison) and after (`shared_after`:
    the criterion, which with quote markers also compares `unquoted`), characters cut
    (verbatim stretches), and paragraphs dropped as near duplicates."""

    before: dict[str, Overlap]
    after: dict[str, Overlap]
    removed_chars: dict[str, int]
    near_duplicates_removed: dict[str, int]
    shared_before: dict[str, int] = field(default_factory=dict)
    shared_after: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not any(o.paragraphs for o in self.after.values()) and not any(self.shared_after.values())

    def as_dict(self) -> dict:
        return {"before": {k: v.as_dict() for k, v in self.before.items()},
                "after": {k: v.as_dict() for k, v in self.after.items()},
                "shared_chars_before": dict(self.shared_before),
                "shared_chars_after": dict(self.shared_after),
                "removed_chars": dict(self.removed_chars),
                "near_duplicates_removed": dict(self.near_duplicates_removed)}

    def metrics(self) -> dict[str, float]:
        """Flat float metrics: `overlap_{before,after}_{pair}_{paragraphs,chars,fraction}`,
        `shared_chars_{before,after}_{pair}`, `removed_chars_{pair}`,
        `near_duplicates_removed_{pair}`."""
        out = {}
        for when, table in (("before", self.before), ("after", self.after)):
            for pair, o in table.items():
                out.update({f"overlap_{when}_{pair}_paragraphs": float(o.paragraphs),
                            f"overlap_{when}_{pair}_chars": float(o.chars),
                            f"overlap_{when}_{pair}_fraction": float(o.fraction)})
        for when, table in (("before", self.shared_before), ("after", self.shared_after)):
            out.update({f"shared_chars_{when}_{pair}": float(n) for pair, n in table.items()})
        out.update({f"removed_chars_{k}": float(v) for k, v in self.removed_chars.items()})
        out.update({f"near_duplicates_removed_{k}": float(v) for k, v in self.near_duplicates_removed.items()})
        return out


def _compares_unquoted(quote_markers: bool, held: list[str], side: list[str]) -> bool:
    """Whether the `unquoted` comparison runs too: asked for, and either side has quote markers
    (without any, it is the plain comparison again)."""
    return quote_markers and (has_quote_markers(held) or has_quote_markers(side))


def shared_after(held: list[str], side: list[str], min_chars: int, quote_markers: bool = True,
                 index_of=None) -> int:
    """What cleaning must bring to 0: `shared_chars`, and where `_compares_unquoted`, the same
    with both `unquoted`, the larger (`index_of(unquote)`: the held-out text's index in that
    form, made before; by default made here)."""
    index_of = index_of or (lambda unquote: held_index(held, min_chars, unquote))
    plain = shared_chars(held, side, min_chars, index=index_of(False))
    if not _compares_unquoted(quote_markers, held, side):
        return plain
    return max(plain, shared_chars(held, side, min_chars, unquote=True, index=index_of(True)))


def remove_shared(side: list[str], held: list[str], min_chars: int, index_of,
                  quote_markers: bool = True) -> tuple[list[str], int]:
    """`remove_contained` in the plain comparison, then, where `_compares_unquoted`, in the
    `unquoted` one (`index_of(unquote)`: the held-out text's index in that form)."""
    side, removed = remove_contained(side, held, min_chars, index_of(False))
    if _compares_unquoted(quote_markers, held, side):
        side, more = remove_contained(side, held, min_chars, index_of(True), unquote=True)
        removed += more
    return side, removed


def decontaminate(splits: Splits, cfg) -> tuple[Splits, Decontamination]:
    """Cut held-out text out of the training side of every pair (`DecontaminateConfig`):
    every stretch of `min_chars` characters or more that eval or general_eval also holds out
    of valid and train, that valid holds out of train (`remove_contained`); with
    `cfg.near_duplicates`, also the training-side paragraphs near-identical to a held-out
    one; with `cfg.quote_markers`, both compared once more `unquoted` (`remove_shared`), so a
    held-out paragraph quoted line by line in a reply goes too. Passes repeat until one
    changes nothing. `eval` and `general_eval` are never touched.
    """
    # In canonical form from the start, so that a pass changes a side only by cutting text.
    splits = Splits(*([canonical(d) for d in getattr(splits, name)] for name in _SPLIT_NAMES))
    indexes: dict[tuple[str, bool], tuple[list[str], SharedText]] = {}  # (held split, unquoted) -> (its documents, their index)

    def index_of(held: str, unquote: bool) -> SharedText:  # the test splits never change; validation may
        docs = getattr(splits, held)
        if (held, unquote) not in indexes or indexes[held, unquote][0] is not docs:
            indexes[held, unquote] = (docs, held_index(docs, cfg.min_chars, unquote))
        return indexes[held, unquote][1]

    before = measure_overlap(splits, cfg.min_chars)
    shared_before = {name: shared_chars(getattr(splits, held), getattr(splits, side), cfg.min_chars,
                                        index=index_of(held, False)) for name, held, side in PAIRS}
    removed = {name: 0 for name, _, _ in PAIRS}
    near = {name: 0 for name, _, _ in PAIRS}
    pairs = {name: (held, side) for name, held, side in PAIRS}

    changed = True
    while changed:
        changed = False
        for name in _CLEANING_ORDER:
            held, side = pairs[name]
            docs, cut = remove_shared(getattr(splits, side), getattr(splits, held), cfg.min_chars,
                                      lambda unquote, held=held: index_of(held, unquote), cfg.quote_markers)
            dropped = 0
            if cfg.near_duplicates:
                docs, dropped = remove_near_duplicates(docs, getattr(splits, held), cfg.min_chars,
                                                       cfg.near_duplicate_jaccard, cfg.shingle_words)
            if docs != getattr(splits, side):
                splits = replace(splits, **{side: docs})
                removed[name] += cut
                near[name] += dropped
                changed = True
        if changed:
            continue
        # What the check finds that the stretch index missed (`remove_found`): cut, then all again.
        after = measure_overlap(splits, cfg.min_chars)
        for name in _CLEANING_ORDER:
            held, side = pairs[name]
            if after[name].paragraphs:
                docs, cut = remove_found(getattr(splits, side), getattr(splits, held), cfg.min_chars)
                if docs != getattr(splits, side):
                    splits = replace(splits, **{side: docs})
                    removed[name] += cut
                    changed = True
    shared_left = {name: shared_after(getattr(splits, held), getattr(splits, side), cfg.min_chars, cfg.quote_markers,
                                      lambda unquote, held=held: index_of(held, unquote)) for name, held, side in PAIRS}
    return splits, Decontamination(before, after, removed, near, shared_before, shared_left)


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


def eval_document_count(tokenizer, docs: list[str], max_tokens: int) -> int:
    """How many leading documents `tokenize_documents(tokenizer, docs, max_tokens)` reads
    from: the smallest k whose documents alone give `max_tokens` tokens (len(docs) if all of
    them give fewer). Doubling, then binary search: no call tokenizes much more than twice the
    documents general_eval needs."""
    def enough(j: int) -> bool:
        return tokenize_documents(tokenizer, docs[:j], max_tokens).numel() >= max_tokens

    hi = 1
    while hi < len(docs) and not enough(hi):
        hi *= 2
    if hi >= len(docs):
        if not enough(len(docs)):
            return len(docs)
        hi = len(docs)
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class GeneralTrain:
    """The general train split and how it was made (`general_train_split`)."""

    docs: list[str]
    eval_documents: int      # leading general documents general_eval reads from
    skipped_documents: int   # the margin after them, and documents whose exact text general_eval holds
    removed_chars: int       # held-out text cut out (general_eval's, the domain test and validation splits' text)
    overlap_after: dict[str, Overlap]
    shared_after: dict[str, int]  # characters still shared with each held-out text (`shared_chars`): 0


def general_train_split(tokenizer, docs: list[str], eval_max_tokens: int, train_max_chars: int,
                        held_out: list[str], min_chars: int, selected_on: list[str],
                        quote_markers: bool = True) -> GeneralTrain:
    """Training-side general text, distinct from general_eval (the first `eval_max_tokens`
    tokens of `docs`): the documents after those general_eval reads from, less one document of
    margin (the last eval token may reach across a document break), up to about
    `train_max_chars` characters, with every paragraph (>= min_chars) of the general_eval
    documents, of `held_out` (the domain test split) and of `selected_on` (the domain
    validation split, on which choices are made) cut out, as `decontaminate` does: a general
    corpus can quote the domain's text (a library's sources its documentation), and text
    calibrated on would favour the artifact calibrated on it where it is evaluated or chosen."""
    k = eval_document_count(tokenizer, docs, eval_max_tokens)
    eval_docs = docs[:k]
    eval_texts = set(eval_docs)
    candidates, total, skipped = [], 0, min(len(docs) - k, 1)
    for d in docs[k + 1:]:
        if d in eval_texts:
            skipped += 1
            continue
        candidates.append(d)
        total += len(d)
        if total >= train_max_chars:
            break
    held = {"general_eval_in_general_train": eval_docs, "domain_eval_in_general_train": held_out,
            "domain_valid_in_general_train": selected_on}
    # Each held-out text on its own, as the checks below index it, and what the verbatim check
    # would find (`remove_found`: boilerplate the index keeps at some copies only), until
    # neither cuts anything. The held-out texts do not change: each is indexed once.
    @functools.cache
    def index_of(name: str, unquote: bool) -> SharedText:
        return held_index(held[name], min_chars, unquote)

    train, removed, changed = candidates, 0, True
    while changed:
        changed = False
        for name, texts in held.items():
            cut, n = remove_shared(train, texts, min_chars, lambda unquote, name=name: index_of(name, unquote),
                                   quote_markers)
            cut, m = remove_found(cut, texts, min_chars)
            if cut != train:
                train, removed, changed = cut, removed + n + m, True
    after = {name: overlap(docs, train, min_chars) for name, docs in held.items()}
    shared = {name: shared_after(docs, train, min_chars, quote_markers, lambda unquote, name=name: index_of(name, unquote))
              for name, docs in held.items()}
    return GeneralTrain(train, k, skipped, removed, after, shared)


def windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of a token stream; the last partial one is dropped."""
    n = stream.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seq_len].view(n, seq_len)
