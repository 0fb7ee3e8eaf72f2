"""Data sources, the split by document, decontamination of the splits, tokenization."""
from __future__ import annotations

import json
import random
import os
import re
import textwrap
import sysconfig
from pathlib import Path

import pytest
import torch

from qlora_pipeline import data
from qlora_pipeline.errors import DataError
from qlora_pipeline.recipe import DataSource, DecontaminateConfig
from tests.conftest import cli, tiny_recipe


def test_python_docs_split_matches_the_baseline_protocol(smollm2_dir):
    from transformers import AutoTokenizer

    docs = data.python_docs()
    assert len(docs) == 79
    splits = data.split_documents(docs, 5, 5)
    train, held = splits.train, splits.eval
    # The topics 'else' (held out) and 'if' share their text: the train copy is dropped.
    assert (len(train), len(splits.valid), len(held)) == (49, 13, 16)
    assert not set(train) & set(held) and not set(train) & set(splits.valid)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # docs/baselines.md#protocol: 17,203 eval tokens (same windows); its 95,904 train tokens include the leaked copy.
    assert data.tokenize_documents(tok, held).numel() == 17203
    assert data.tokenize_documents(tok, train).numel() < 95904


def test_python_stdlib_is_real_source_code():
    docs = data.python_stdlib(max_chars=200_000)
    assert sum(map(len, docs)) >= 200_000
    assert any("def " in d for d in docs)
    assert docs == data.python_stdlib(max_chars=200_000)  # deterministic


def test_windows_drop_the_partial_tail():
    w = data.windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data.windows(torch.arange(10), 4, max_windows=1).shape == (1, 4)


def test_local_sources(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first document\nwith two lines")
    (folder / "b.md").write_text("# second")
    (folder / "rows.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    docs = data.load_documents(DataSource(path=str(folder), text_field="body"), "data.domain")
    assert "first document\nwith two lines" in docs and "# second" in docs
    assert {"row 0", "row 1", "row 2"} <= set(docs)

    import datasets

    datasets.Dataset.from_dict({"text": ["p1", "p2"]}).to_parquet(str(tmp_path / "t.parquet"))
    assert data.load_documents(DataSource(path=str(tmp_path / "t.parquet")), "data.domain") == ["p1", "p2"]


def test_missing_text_field_names_the_key(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"data.domain.text_field: column 'text' not in .*columns: content"):
        data.load_documents(DataSource(path=str(f)), "data.domain")


def test_records_without_text_are_skipped_with_a_warning_that_counts_them(tmp_path, caplog):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ({"text": "kept"}, {"txt": "typo"}, {"text": None}, {"text": "too"})))
    with caplog.at_level("WARNING", logger="qlora_pipeline.data"):
        assert data.load_documents(DataSource(path=str(f)), "data.domain") == ["kept", "too"]
    assert f"data.domain: 2 of 4 records in {f} have no text under 'text'" in caplog.text
    caplog.clear()
    f.write_text(json.dumps({"text": "all fine"}) + "\n")
    with caplog.at_level("WARNING", logger="qlora_pipeline.data"):
        data.load_documents(DataSource(path=str(f)), "data.domain")
    assert caplog.text == ""


def test_a_bad_line_in_json_lines_is_named_by_file_and_line(tmp_path):
    # Preflight reads the first record only; `datasets` then said "An error occurred while
    # generating the dataset" about the folder's first file, whichever was broken.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "fine"}\n')
    bad = corpus / "b.jsonl"
    bad.write_text('{"text": "first"}\n\n{"text": "third"\n')
    with pytest.raises(DataError, match=re.escape(f"data.domain.path: {bad}: line 3 is not valid JSON (Expecting ',' "
                                                  "delimiter, column 17); fix or delete that line")):
        data.load_documents(DataSource(path=str(corpus)), "data.domain")
    bad.write_text('{"text": "first"}\n["a", "list"]\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}: line 2 is a JSON list, not an object")):
        data.load_documents(DataSource(path=str(corpus)), "data.domain")


def test_whitespace_only_source_is_empty(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("   \n\n  ")
    with pytest.raises(DataError, match="data.general: the source holds no text: every document is empty or "
                                        "whitespace .*; give a source with text"):
        data.load_documents(DataSource(path=str(f)), "data.general")


def test_an_empty_json_lines_file_is_a_data_error_naming_it(tmp_path):
    """`datasets` raises a bare StopIteration for it, whose message is empty: the error said
    only "IndexError" (exit 1)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a document of text")
    empty = corpus / "empty.jsonl"
    for content in ("", "\n  \n"):
        empty.write_text(content)
        with pytest.raises(DataError, match=re.escape(f"data.domain.path: {empty} holds no JSON record")):
            data.load_documents(DataSource(path=str(corpus)), "data.domain")
    assert data._reason(StopIteration()) == "StopIteration"
    assert data._reason(ValueError("first line\nsecond")) == "ValueError: first line"


@pytest.mark.parametrize("files, expected", [
    ({"s.jsonl": '{"text": "broken \\ud800 here"}\n'},
     "s.jsonl: line 1 holds a lone surrogate escape"),
    ({"a.jsonl": '{"text": "one"}\n', "b.jsonl": '{"text": "two", "meta": {"b": 1}}\n{"text": "three"\n'},
     "{b}: line 2 is not valid JSON"),
    ({"p.parquet": None}, "p.parquet holds no rows; remove it or fill it"),
], ids=["lone-surrogate", "bad-line-after-a-good-file", "parquet-no-rows"])
def test_a_data_file_datasets_cannot_read_is_named_with_why(files, expected, tmp_path):
    """These failed with "DatasetGenerationError: An error occurred while generating the
    dataset", naming the folder's first file, whatever was wrong (found by QA)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, content in files.items():
        if content is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), corpus / name)
        else:
            (corpus / name).write_text(content)
    with pytest.raises(DataError) as err:
        data.load_documents(DataSource(path=str(corpus)), "data.domain")
    assert expected.format(a=corpus / "a.jsonl", b=corpus / "b.jsonl") in str(err.value)


def test_json_lines_files_whose_other_fields_differ_are_read(tmp_path, caplog):
    """Only the text field is read, but `datasets` reads the files as one table, whose columns
    the first file fixes: a `meta` object with other keys, or a field that is a number in one
    file and text in another, failed the whole corpus (found by QA; the message named
    neither the field nor the file). Files that do not agree are read one at a time, in the
    same order; a file without the text field gives records without text, as in one table."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one", "meta": {"a": 1}, "n": 1}\n{"text": "two", "n": null}\n')
    (corpus / "b.jsonl").write_text('{"text": "three", "meta": {"b": "x"}, "n": "x"}\n')
    (corpus / "c.jsonl").write_text('{"body": "not read", "meta": [{"c": 2}]}\n')
    (corpus / "d.jsonl").write_text('{"text": "four", "meta": [1, 2]}\n')
    with caplog.at_level("WARNING", logger="qlora_pipeline.data"):
        assert data.load_documents(DataSource(path=str(corpus)), "data.domain") == ["one", "two", "three", "four"]
    assert "data.domain: 1 of 5 records in" in caplog.text
    for name in ("a", "b", "d"):
        (corpus / f"{name}.jsonl").unlink()
    with pytest.raises(DataError, match=r"data.domain.text_field: column 'text' not in .*c.jsonl; columns: body, meta"):
        data.load_documents(DataSource(path=str(corpus)), "data.domain")


def test_a_json_lines_file_whose_text_field_mixes_kinds_reads_alike_in_any_folder(tmp_path, caplog):
    """Beside another file, `{"text": 5}` became the text `5` and `{"text": "six"}` the text
    `"six"`, quotes included (`datasets` cast the file's JSON-valued column to strings); alone
    the same file gave `six` and skipped the number (found in review)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.jsonl").write_text('{"text": 5}\n{"text": "six"}\n')
    alone = data.load_documents(DataSource(path=str(corpus)), "data.domain")
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    with caplog.at_level("WARNING", logger="qlora_pipeline.data"):
        assert data.load_documents(DataSource(path=str(corpus)), "data.domain") == ["one", *alone] == ["one", "six"]
    assert "1 of 3 records in" in caplog.text


def test_json_lines_files_of_text_are_read_as_one_table(tmp_path, monkeypatch):
    """One file at a time pays `datasets`' set-up per file (a folder of many shards read slowly,
    found in review): only
    files whose text field is not text everywhere, or that `datasets` cannot read together,
    are read so."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.jsonl").write_text(f'{{"text": "doc {i}", "n": {i}}}\n{{"text": null}}\n')
    monkeypatch.setattr(data, "_read_files_apart", lambda *a: pytest.fail("read one file at a time"))
    assert data.load_documents(DataSource(path=str(corpus)), "data.domain") == ["doc 0", "doc 1", "doc 2"]


def test_a_corpus_file_rewritten_with_its_mtime_kept_is_read_anew(tmp_path):
    """`datasets` knows a local file in its cache by path and mtime: the data stage re-ran
    (its fingerprint hashes content) but read the text the file held before."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    f = corpus / "doc.txt"
    (corpus / "rows.jsonl").write_text(json.dumps({"text": "a record"}) + "\n")
    f.write_text("the first version of the text")
    assert data.load_documents(DataSource(path=str(corpus)), "data.domain") == ["the first version of the text",
                                                                                "a record"]
    st = f.stat()
    f.write_text("the other version of the text")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert data.load_documents(DataSource(path=str(corpus)), "data.domain")[0] == "the other version of the text"


def test_a_corpus_is_read_without_writing_to_the_users_datasets_cache(tmp_path, monkeypatch):
    import datasets

    user_cache = tmp_path / "user_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", user_cache)
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"text": "a record"}) + "\n")
    assert data.load_documents(DataSource(path=str(f)), "data.domain") == ["a record"]
    assert not user_cache.exists() or not any(user_cache.iterdir())


def test_a_bad_json_lines_file_is_reported_once_without_the_librarys_log_lines(tmp_path, capfd, caplog):
    """`datasets` logged "Failed to load JSON ... JSON parse error" (twice) before our message."""
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        data.load_documents(DataSource(path=str(f)), "data.domain")
    assert not [r for r in caplog.records if r.name.startswith("datasets")]
    err = capfd.readouterr().err
    assert "Failed to load JSON" not in err and "JSON parse error" not in err


# ---------------------------------------------------------------- decontamination
# The checks below re-derive paragraphs with their own code, not pipeline.data's.


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _paragraphs(text: str, min_chars: int = 80) -> list[str]:
    return [p for p in (_flat(p) for p in re.split(r"\n\s*\n", text)) if len(p) >= min_chars]


def _windows(docs: list[str], n: int = 80) -> set[str]:
    """Every n-character window of each document, lower case and whitespace-normalized."""
    flat = [_flat(d).lower() for d in docs]
    return {f[i:i + n] for f in flat for i in range(len(f) - n + 1)}


def _shares_window(text: str, windows: set[str], n: int = 80) -> list[str]:
    low = text.lower()
    return [low[i:i + n] for i in range(len(low) - n + 1) if low[i:i + n] in windows][:3]


def _decoded_streams(stage_output: Path, tokenizer_dir: Path) -> dict[str, str]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    streams = load_file(str(stage_output / "tokens.safetensors"))
    return {k: tok.decode(v.tolist(), clean_up_tokenization_spaces=False) for k, v in streams.items()}


def test_python_docs_held_out_text_is_nowhere_in_training_text(smollm2_dir, tmp_path, write_recipe, monkeypatch):
    """The real corpus, the real tokenizer: decoded from the stage's token streams, no test
    paragraph (>= 80 chars) is inside the train or valid text, no valid paragraph inside train."""
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tiny_recipe(smollm2_dir, tmp_path))
    assert cli("run", str(path), "--only", "data") == 0
    out = tmp_path / "runs" / "tiny" / "data" / "output"
    text = _decoded_streams(out, smollm2_dir)
    assert set(text) == {"domain_train", "domain_valid", "domain_eval", "general_eval"}
    flat = {k: _flat(v) for k, v in text.items()}
    held, valid = _paragraphs(text["domain_eval"]), _paragraphs(text["domain_valid"])
    assert len(held) > 200 and len(valid) > 200
    assert [p for p in held if p in flat["domain_train"]] == []
    assert [p for p in held if p in flat["domain_valid"]] == []
    assert [p for p in valid if p in flat["domain_train"]] == []
    assert text["domain_eval"] == "\n\n".join(data.python_docs()[::5])  # the test documents stay whole
    # Nor any stretch of 80 characters (lower case, whitespace-normalized) of a held-out document.
    test_windows = _windows(data.python_docs()[::5])
    valid_windows = _windows(text["domain_valid"].split("\n\n"))
    assert not _shares_window(flat["domain_train"], test_windows | valid_windows)
    assert not _shares_window(flat["domain_valid"], test_windows)

    stats = json.loads((out / "data.json").read_text())
    assert (stats["train_documents"], stats["valid_documents"], stats["eval_documents"]) == (49, 13, 16)
    assert stats["domain_eval_tokens"] == 17203  # the test split is untouched
    before, after = stats["decontamination"]["before"], stats["decontamination"]["after"]
    # The nesting is real: nearly half of the test text sat verbatim in the training documents.
    assert before["eval_in_train"]["paragraphs"] > 100 and before["eval_in_train"]["fraction"] > 0.4
    assert before["valid_in_train"]["paragraphs"] > 40
    assert all(o["paragraphs"] == 0 and o["chars"] == 0 and o["fraction"] == 0 for o in after.values())
    metrics = json.loads((out.parent / "manifest.json").read_text())["metrics"]
    assert metrics["overlap_before_eval_in_train_paragraphs"] == before["eval_in_train"]["paragraphs"]
    assert metrics["overlap_after_eval_in_train_fraction"] == 0.0


_VOCABULARY = ("argument attribute binding block buffer call class clause closure context decorator default "
               "descriptor dictionary element encoding exception expression frame function generator handler "
               "identifier import instance iterator keyword lambda list literal loop method module namespace "
               "object operator package parameter pattern protocol reference scope sequence slice statement "
               "string subclass suite target token tuple type value variable").split()


def _long(tag: str) -> str:
    """A distinct paragraph of well over 80 characters: 16 words drawn by a generator seeded
    with the tag, so that two tags share no stretch of more than a few words (the
    decontamination cuts every shared stretch of 80 characters, not only whole paragraphs)."""
    rnd = random.Random(tag)
    return f"The {tag} paragraph: {' '.join(rnd.choice(_VOCABULARY) for _ in range(16))}."


def test_nested_and_spanning_held_out_text_is_cut_from_the_training_side_only(tiny_llama_dir, tmp_path, write_recipe,
                                                                               monkeypatch):
    """holdout_every=3, valid_every=3 over 6 documents: eval = {0, 3}, valid = {1, 5}, train = {2, 4}."""
    p_a, p_b, q, v1, w1, s5, u4 = (_long(t) for t in ("alpha", "beta", "gamma", "valid", "wide", "solo", "unrelated"))
    q1 = q[:60].rsplit(" ", 1)[0]  # q = q1 + " " + q2, split between two words
    q2 = q[len(q1) + 1:]
    intro, outro = _long("intro"), _long("outro")
    lead, trail = "Leading words on the same line as the start of it.", "and trailing words after it."
    docs = [
        f"{p_a}\n\n{p_b}",                                           # 0 eval: nested whole in doc 2
        f"{v1}\n\n{w1}",                                             # 1 valid: v1 also sits in doc 4
        f"{intro}\n\n{p_a}\n\n{p_b}\n\n{outro}",                   # 2 train: holds doc 0
        q,                                                            # 3 eval: one paragraph
        f"{u4}\n\n{lead} {q1}\n\n  {q2} {trail}\n\n{v1}",            # 4 train: q across a paragraph break
        f"{s5}\n\n{p_b}",                                            # 5 valid: holds an eval paragraph
    ]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(d)
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, data={"domain": {"path": str(folder)}, "general": None, "seq_len": 16,
                                                         "holdout_every": 3, "valid_every": 3})
    assert cli("run", str(write_recipe(recipe)), "--only", "data") == 0
    out = tmp_path / "runs" / "tiny" / "data" / "output"
    text = _decoded_streams(out, tiny_llama_dir)
    assert text["domain_eval"] == f"{docs[0]}\n\n{docs[3]}"  # held-out documents unchanged
    assert text["domain_valid"] == f"{docs[1]}\n\n{s5}"  # valid lost exactly the eval paragraph
    # Train lost exactly the contained text: doc 0 inside doc 2; q, which spans a paragraph
    # break inside larger paragraphs of doc 4; and the valid paragraph v1.
    assert text["domain_train"] == f"{intro}\n\n{outro}\n\n{u4}\n\n{lead}\n\n{trail}"
    report = json.loads((out / "data.json").read_text())["decontamination"]
    assert {k: v["paragraphs"] for k, v in report["before"].items()} == {
        "eval_in_train": 3, "eval_in_valid": 1, "valid_in_train": 2,
        "general_eval_in_train": 0, "general_eval_in_valid": 0}  # no general text here
    assert all(v["paragraphs"] == 0 for v in report["after"].values())


def _data_stage_with_general_text(tiny_llama_dir, tmp_path, write_recipe, monkeypatch, docs: list[str],
                                  general_files: dict[str, str]) -> tuple[dict[str, str], dict]:
    """The data stage over 6 domain documents (holdout_every=3, valid_every=3: eval = {0, 3},
    valid = {1, 5}, train = {2, 4}) and a general folder of `general_files`: the decoded
    streams and the decontamination report."""
    domain, general = tmp_path / "domain", tmp_path / "general"
    domain.mkdir()
    general.mkdir()
    for i, d in enumerate(docs):
        (domain / f"doc{i}.txt").write_text(d)
    for name, content in general_files.items():
        (general / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, data={"domain": {"path": str(domain)}, "general": {"path": str(general)},
                                                         "seq_len": 16, "holdout_every": 3, "valid_every": 3})
    assert cli("run", str(write_recipe(recipe)), "--only", "data") == 0
    out = tmp_path / "runs" / "tiny" / "data" / "output"
    return _decoded_streams(out, tiny_llama_dir), json.loads((out / "data.json").read_text())["decontamination"]


def test_the_general_text_evaluated_for_forgetting_is_cut_from_train_and_valid(tiny_llama_dir, tmp_path, write_recipe,
                                                                               monkeypatch):
    """general_eval is held out too: a general paragraph inside a domain training document
    (line-wrapped there) or a validation document is cut, so the forgetting figure is on
    text no stage has trained on or selected on. 6 domain documents as above: eval = {0, 3},
    valid = {1, 5}, train = {2, 4}."""
    g, h, other = _long("general"), _long("library"), _long("other")
    docs = [_long("e0"), f"{_long('v1')}\n\n{h}", f"{_long('t2')}\n\n{g.replace(' ', chr(10))}\n\n{_long('t2b')}",
            _long("e3"), _long("t4"), _long("v5")]
    text, report = _data_stage_with_general_text(
        tiny_llama_dir, tmp_path, write_recipe, monkeypatch, docs,
        {"g.txt": f"{other}\n\n{g}\n\n{h}\n\n" + " ".join(f"word{i}" for i in range(400))})
    assert text["domain_train"] == f"{_long('t2')}\n\n{_long('t2b')}\n\n{_long('t4')}"
    assert text["domain_valid"] == f"{_long('v1')}\n\n{_long('v5')}"
    assert text["domain_eval"] == f"{docs[0]}\n\n{docs[3]}"
    assert text["general_eval"].startswith(f"{other}\n\n{g}\n\n{h}")  # the general text itself is untouched
    assert report["before"]["general_eval_in_train"]["paragraphs"] == 1
    assert report["before"]["general_eval_in_valid"]["paragraphs"] == 1
    assert all(v["paragraphs"] == 0 for v in report["after"].values())


def test_a_paragraph_split_across_two_training_documents_is_cut_from_both():
    # The token stream joins documents with a blank line, so a paragraph can span two of them.
    held = _long("held")
    first = held[:50].rsplit(" ", 1)[0]
    second = held[len(first) + 1:]
    splits = data.Splits(train=[f"{_long('one')}\n\n{first}", f"{second}\n\n{_long('two')}"], valid=[_long("v")],
                         eval=[held])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert clean.train == [_long("one"), _long("two")]
    assert report.before["eval_in_train"].paragraphs == 1 and report.clean


def test_a_match_inside_longer_words_and_a_paragraph_of_few_long_words_are_found():
    held = _long("glued")
    few_words = "x" * 50 + " " + "y" * 40  # two words: searched without the word index
    splits = data.Splits(train=[f"({held}) and [{few_words}]"], valid=[_long("v")], eval=[f"{held}\n\n{few_words}"])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    # Substrings, not whole words: the brackets around the matches stay.
    assert clean.train == ["(\n\n) and [\n\n]"]
    assert report.before["eval_in_train"].paragraphs == 2


def plain_occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of `needle` in `text`, overlapping ones included: one
    `str.find` after another, the search the fast ones are checked against."""
    found, i = [], text.find(needle)
    while i >= 0:
        found.append((i, i + len(needle)))
        i = text.find(needle, i + 1)
    return found


def test_the_word_index_finds_what_a_plain_search_finds():
    splits = data.split_documents(data.python_docs(), 5, 5)
    view = data._NormalizedSide(splits.train)
    needles = {p for d in splits.eval + splits.valid for p in data.searched(d, 80)}
    assert sorted(view.find_all(needles)) == sorted(o for n in needles for o in plain_occurrences(view.text, n))


def test_min_chars_decides_which_paragraphs_count():
    short = "A sixty-character paragraph of held-out text, nested below."  # 59 characters
    assert 50 <= len(short) < 80
    splits = data.Splits(train=[f"{_long('t')}\n\n{short}"], valid=[_long("v")], eval=[f"{short}\n\n{_long('e')}"])
    kept, report = data.decontaminate(splits, DecontaminateConfig())  # min_chars 80: not a paragraph that counts
    assert kept.train == splits.train and report.before["eval_in_train"].checked_paragraphs == 1
    cut, report = data.decontaminate(splits, DecontaminateConfig(min_chars=50))
    assert cut.train == [_long("t")]
    assert report.before["eval_in_train"].paragraphs == 1 and report.before["eval_in_train"].checked_paragraphs == 2


def test_near_duplicate_switch_removes_a_paragraph_one_word_apart():
    held = ("The finally clause runs whenever control leaves the try statement, whether by a return, "
            "a break or an exception raised in the block.")
    near = held.replace("try statement", "try block")  # in the middle: no verbatim stretch of 80 characters
    assert data.shared_chars([held], [near], 80) == 0 and data.shared_chars([held], [near], 60) > 0
    splits = data.Splits(train=[f"{_long('t')}\n\n{near}"], valid=[_long("v")], eval=[held])
    kept, report = data.decontaminate(splits, DecontaminateConfig())
    assert kept.train == splits.train and report.near_duplicates_removed["eval_in_train"] == 0
    cut, report = data.decontaminate(splits, DecontaminateConfig(near_duplicates=True))
    assert cut.train == [_long("t")] and report.near_duplicates_removed["eval_in_train"] == 1
    assert report.metrics()["near_duplicates_removed_eval_in_train"] == 1.0
    # A higher threshold than this pair's similarity keeps it.
    strict, _ = data.decontaminate(splits, DecontaminateConfig(near_duplicates=True, near_duplicate_jaccard=0.95))
    assert strict.train == splits.train


def test_python_stdlib_leaves_out_pydoc_data():
    root = Path(sysconfig.get_paths()["stdlib"])
    assert (root / "pydoc_data" / "topics.py").is_file()  # it is there to leave out
    files = data.stdlib_files()
    assert len(files) > 500 and not any("pydoc_data" in p.parts for p in files)


def test_a_long_document_is_cut_at_paragraph_breaks_after_document_chars():
    paras = [f"paragraph {i} " + "word " * (5 + i % 7) for i in range(40)]
    text = "\n\n".join(paras)
    pieces = data.split_long_document(text, 200)
    assert len(pieces) > 5 and all(len(p) >= 200 for p in pieces[:-1])
    assert "\n\n".join(pieces) == text  # consecutive, nothing lost but the breaks at the cuts
    for p in pieces[:-1]:  # each ends at the first paragraph break after 200 characters
        assert len(p.rsplit("\n\n", 1)[0]) < 200 if "\n\n" in p else True
    lines = text.replace("\n\n", "\n")  # no blank lines: cut at line breaks
    assert "\n".join(data.split_long_document(lines, 200)) == lines and len(data.split_long_document(lines, 200)) > 5
    assert data.split_long_document("short\n\ntext", 200) == ["short\n\ntext"]
    assert data.split_long_document("x" * 500, 200) == ["x" * 500]  # no break to cut at


def test_a_book_whose_only_blank_line_follows_its_title_is_cut_at_line_breaks():
    """One blank line, after the title, was enough to stop the cuts at line breaks: the book
    stayed one document and the error then recommended document_chars, already in use."""
    lines = [f"Sentence {i} of the book, on a line of its own, says something." for i in range(600)]
    book = "TITLE OF THE BOOK\n\n" + "\n".join(lines)
    pieces = data.split_long_document(book, 1000)
    assert len(pieces) > 20 and all(1000 <= len(p) < 1100 for p in pieces[:-1])
    assert "\n".join(pieces) == book  # the blank line is inside the first piece: no cut there
    # A paragraph break within twice document_chars is still where a piece ends.
    text = "\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:])
    assert data.split_long_document(text, 1000)[0] == "\n".join(lines[:20])  # 1,300 characters


def test_splitting_many_documents_keeps_every_split_whole():
    """Many documents (the held-out texts' union is built once now; per training document it
    made 80,000 documents take 52 s): every document lands in exactly one split."""
    docs = [f"record {i}" for i in range(40_000)]
    splits = data.split_documents(docs, 5, 5)
    assert (len(splits.eval), len(splits.valid), len(splits.train)) == (8000, 6400, 25600)
    assert sorted(splits.eval + splits.valid + splits.train) == sorted(docs)


def test_one_big_file_becomes_many_documents_with_document_chars(tmp_path):
    import pydoc_data.topics

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    assert len(data.load_documents(DataSource(path=str(book)), "data.domain")) == 1
    docs = data.load_documents(DataSource(path=str(book), document_chars=4000), "data.domain")
    assert len(docs) > 50 and all(len(d) >= 4000 for d in docs[:-1])
    from qlora_pipeline.recipe import DataConfig
    from qlora_pipeline.stages.data import _require_documents

    cfg = DataConfig()
    _require_documents(data.split_documents(docs, cfg.holdout_every, cfg.valid_every), len(docs), cfg)
    with pytest.raises(DataError, match=r"only 1 document\(s\).*cut long ones into several with data.domain.document_chars"):
        _require_documents(data.split_documents(docs[:1], cfg.holdout_every, cfg.valid_every), 1, cfg)
    # Already set, on a text without line breaks: it cannot cut, and the message says why.
    one_line = tmp_path / "one-line.txt"
    one_line.write_text(" ".join(pydoc_data.topics.topics.values()).replace("\n", " "))
    source = DataSource(path=str(one_line), document_chars=4000)
    docs = data.load_documents(source, "data.domain")
    assert len(docs) == 1
    cfg = DataConfig(domain=source)
    with pytest.raises(DataError, match=r"only 1 document\(s\).*lower data.domain.document_chars \(4000; it cuts a "
                                        r"document only at a paragraph or line break"):
        _require_documents(data.split_documents(docs, cfg.holdout_every, cfg.valid_every), 1, cfg)


def test_an_empty_split_is_a_data_error_naming_the_key():
    from qlora_pipeline.recipe import DataConfig
    from qlora_pipeline.stages.data import _require_clean, _require_documents

    cfg = DataConfig(holdout_every=2)
    two = ["one document of text", "another one"]  # eval gets the first, valid the second
    with pytest.raises(DataError, match=r"^data.valid_every: of 2 document\(s\), none is left for training"):
        _require_documents(data.split_documents(two, cfg.holdout_every, cfg.valid_every), len(two), cfg)
    with pytest.raises(DataError, match=r"^data.holdout_every: only 1 document"):
        _require_documents(data.split_documents(two[:1], 2, 2), 1, cfg)
    # The only training document is the test document, line-wrapped: cleaning empties train.
    cfg = DataConfig(holdout_every=3, valid_every=2)
    docs = [_long("x"), _long("y"), _long("x").replace(" ", "\n")]
    splits = data.split_documents(docs, cfg.holdout_every, cfg.valid_every)
    _require_documents(splits, len(docs), cfg)
    clean, report = data.decontaminate(splits, cfg.decontaminate)
    with pytest.raises(DataError, match=r"^data.decontaminate: every domain train document is held-out text"):
        _require_clean(clean, report, cfg)


def test_overlap_left_after_cleaning_is_a_data_error():
    from qlora_pipeline.stages.data import _require_clean

    splits = data.Splits(train=[_long("e")], valid=[_long("v")], eval=[_long("e")])
    dirty = data.measure_overlap(splits, 80)
    report = data.Decontamination(dirty, dirty, {}, {})
    with pytest.raises(DataError, match=r"data.domain: held-out text is still in the training side.*eval_in_train: 1"):
        _require_clean(splits, report, DecontaminateConfig())


def test_a_corpus_edited_in_place_with_its_size_and_mtime_kept_makes_the_data_stage_stale(
        tiny_llama_dir, tmp_path, write_recipe, monkeypatch, capsys):
    """The data stage's fingerprint holds the content of its local files, not their path,
    size or mtime: an in-place edit that `touch -r` hides still re-runs it."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(_long(f"d{i}") + "\n\n" + _long(f"e{i}"))
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(tiny_llama_dir, tmp_path, data={
        "domain": {"path": str(folder)}, "general": None, "seq_len": 16, "holdout_every": 3, "valid_every": 3}))
    assert cli("run", str(recipe), "--only", "data") == 0
    capsys.readouterr()
    assert cli("plan", str(recipe)) == 0
    assert re.search(r"data\s+skip", capsys.readouterr().out)
    f = folder / "doc2.txt"
    st = f.stat()
    f.write_text(f.read_text().replace("d2", "D2"))  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert cli("plan", str(recipe)) == 0
    assert re.search(r"data\s+run\s+.*settings changed: content\.domain\.files\.doc2\.txt", capsys.readouterr().out)


def test_a_built_in_corpus_is_named_with_the_python_that_ships_it():
    """pydoc_data and the standard library change with each Python release: part of the identity."""
    import platform

    from qlora_pipeline.data_identity import content_identity

    assert platform.python_version() in content_identity(DataSource(builtin="python-docs"))["python"]


def test_held_out_text_in_another_unicode_form_or_line_ending_is_still_found():
    """NFD for NFC, CRLF and lone-CR line endings: the same text to the check and the cut."""
    import unicodedata

    accented = ("Über die naïve Café-Lösung: a résumé of déjà vu, with enough accented characters "
                "(é, à, ü, ö) to pass eighty.")
    nfc, nfd = unicodedata.normalize("NFC", accented), unicodedata.normalize("NFD", accented)
    assert nfc != nfd
    held = [f"{nfc}\n\n{_long('a')}", _long("b")]
    trains = {"nfd": [nfd, _long("t")], "crlf": [f"{_long('x')}\r\n\r\n{_long('a')}\r\n", _long("t")],
              "cr": [f"{_long('x')}\r\r{_long('a')}", _long("t")]}
    for name, train in trains.items():
        splits = data.Splits(train=train, valid=[_long("v")], eval=held)
        assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 1, name
        clean, report = data.decontaminate(splits, DecontaminateConfig())
        assert report.clean, name
        text = _flat(unicodedata.normalize("NFC", " ".join(clean.train)))
        assert _flat(nfc) not in text and _flat(_long("a")) not in text, name
    # A held-out document with lone-CR line endings is split into its paragraphs.
    splits = data.Splits(train=[_long("a")], valid=[_long("v")], eval=[f"{_long('a')}\r\r{_long('c')}", _long("b")])
    assert data.decontaminate(splits, DecontaminateConfig())[0].train == []
    assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 1
    docs = data.load_documents(DataSource(builtin="python-docs"), "data.domain")
    assert all(d == unicodedata.normalize("NFC", d) and "\r" not in d for d in docs)


def test_held_out_text_with_its_case_changed_is_still_found_and_cut_exactly():
    """An upper-cased copy inside a larger training paragraph is the same text to the model:
    found, and exactly it cut (positions map back although the comparison is in lower case,
    a Turkish dotted I, whose lower case is two characters, included)."""
    held = _long("Held") + " İstanbul."
    before, after = "Training words before it on the same line.", "And training words after it."
    train = [f"{before} {held.upper()} {after}", _long("t")]
    splits = data.Splits(train=train, valid=[_long("v")], eval=[held])
    assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 1
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean
    assert clean.train == [f"{before}\n\n{after}", _long("t")]
    assert data.fold_case("İI") == "İi" and data.fold_case("ÄB") == "äb"


def test_a_held_out_document_of_short_paragraphs_is_found_inside_a_training_document():
    """Each of its paragraphs is under min_chars; joined they are not: copied whole (or its
    longer part) into a training document, with other wrapping, it is cut out all the same."""
    verse = [f"line {i} of a short verse" for i in range(12)]
    poem = "\n\n".join(verse)
    assert all(len(line) < 80 for line in verse)
    train = [f"{_long('x')}\n\n" + "\r\n\r\n".join(verse) + f"\n\n{_long('y')}",  # all of it
             f"{_long('z')}\n\n" + "\n".join(verse[3:]),                          # most of it, one paragraph
             _long("t")]
    splits = data.Splits(train=train, valid=[_long("v")], eval=[poem, _long("b")])
    assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs >= 2
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean
    text = _flat(" ".join(clean.train))
    # At most a remainder shorter than two pieces survives at an edge: no run of 4 verse lines.
    assert not any(_flat(" ".join(verse[i:i + 4])) in text for i in range(len(verse) - 3))
    assert _flat(_long("x")) in text and _flat(_long("y")) in text and _flat(_long("t")) in text
    # A lone short paragraph (a heading) is still not checked: it recurs legitimately.
    assert data.paragraphs("Changed in version 3.5.\n\n" + _long("p"), 80) == [_flat(_long("p")).lower()]


def test_a_byte_order_mark_does_not_hide_a_held_out_paragraph():
    """A file saved with a BOM starts with U+FEFF, which is no whitespace: the held-out
    document's first paragraph began with it and its copy in a training paragraph was not
    found."""
    held = _long("bom")
    assert data.canonical("\ufeff" + held) == held
    train = [f"Training words before it. {held} And training words after it.", _long("t")]
    splits = data.Splits(train=train, valid=[_long("v")], eval=["\ufeff" + held, _long("e")])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.before["eval_in_train"].paragraphs == 1 and report.clean
    assert clean.train == ["Training words before it.\n\nAnd training words after it.", _long("t")]


def test_held_out_text_with_invisible_characters_or_unicode_breaks_is_still_found_and_cut_exactly():
    """A copy with soft hyphens and zero-width characters slipped into its words reads the
    same, and is found and cut to the character (positions map back past the characters the
    comparison drops); a held-out document whose paragraphs are separated by U+2029 (or lines
    by U+2028 / NEL) is split into those paragraphs, so one of them copied alone is found."""
    held = _long("hid")
    marked = held.replace("paragraph", "para\u00adgraph").replace("thing", "th\u200bi\u200dng")
    marked = marked.replace(" about ", " \u2060about\u200c ").replace(" one ", " \u200b one ")
    assert marked != held and data.normalize(marked) == data.normalize(held)
    before, after = "Training words before it on the same line.", "And training words after it."
    splits = data.Splits(train=[f"{before} {marked} {after}", _long("t")], valid=[_long("v")], eval=[held])
    assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 1
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean
    assert clean.train == [f"{before}\n\n{after}", _long("t")]
    # The held-out side marked instead: the training copy is plain.
    splits = data.Splits(train=[f"{before} {held} {after}", _long("t")], valid=[_long("v")], eval=[marked])
    assert data.decontaminate(splits, DecontaminateConfig())[0].train == [f"{before}\n\n{after}", _long("t")]
    # The documents keep their joiners: only the comparison drops them.
    assert data.canonical(marked) == marked

    for separator in ("\u2029", "\u2028\u2028", "\x85\x85", "\u2028\n"):
        document = _long("first") + separator + _long("second")
        assert data.paragraphs(document, 80) == [_flat(_long("first")).lower(), _flat(_long("second")).lower()], \
            repr(separator)
        splits = data.Splits(train=[f"{_long('t')}\n\n{_long('second')}"], valid=[_long("v")], eval=[document])
        assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 1, repr(separator)
        assert data.decontaminate(splits, DecontaminateConfig())[0].train == [_long("t")], repr(separator)
    assert data.canonical("a\u2028b\x85c\u2029d") == "a\nb\nc\n\nd"


def test_held_out_text_with_its_quotes_and_dashes_retyped_is_still_found_and_cut_exactly():
    """An editor or a converter swaps straight and typographic quotes, hyphens and dashes when
    text is copied: the copy is the same text, found and cut to the character."""
    held = ("The parser's \"soft\" keywords - match, case and type - are reserved only in context; "
            "see the grammar's 'soft keyword' rules, pages 3-4.")
    typeset = ("The parser’s “soft” keywords — match, case and type — are reserved only in context; "
               "see the grammar’s ‘soft keyword’ rules, pages 3–4.")
    assert len(held) == len(typeset) and data.normalize(held) == data.normalize(typeset)
    before, after = "Training words before it on the same line.", "And training words after it."
    for train_copy, eval_copy in ((typeset, held), (held, typeset)):
        splits = data.Splits(train=[f"{before} {train_copy} {after}", _long("t")], valid=[_long("v")], eval=[eval_copy])
        assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 1
        clean, report = data.decontaminate(splits, DecontaminateConfig())
        assert report.clean and clean.train == [f"{before}\n\n{after}", _long("t")]


@pytest.mark.parametrize("marker", ["> ", ">> ", "> > ", ">>> "])
def test_held_out_text_quoted_line_by_line_is_found_and_cut(marker, monkeypatch):
    """A reply in a forum or a mailing list quotes what it answers with `> ` before every line
    (Markdown's block quote, nested as `>> ` or `> > `): the held-out paragraph, re-wrapped and
    marked on each line, survived decontamination whole, since no 80 characters of the copy
    read as the original did. The markers are no text to the comparison, on either side."""
    held = ("Recent releases of the interpreter keep a per-module cache of compiled regular "
            "expressions, so a pattern compiled inside a loop is looked up rather than parsed "
            "again on every pass; the cache is cleared by calling the purge function.")
    wrapped = textwrap.wrap(held, 60)  # wrapped otherwise than the held-out text is
    quoted = "\n".join(marker + line for line in wrapped)
    own_before, own_after = "You wrote on the list yesterday:", "Thanks, that explains the timings I measured."
    train = [f"{own_before}\n\n{quoted}\n\n{own_after}", _long("t")]
    splits = data.Splits(train=train, valid=[_long("v")], eval=[held, _long("e")])
    # The plain comparison sees no shared stretch; the one without the markers sees the copy.
    assert data.shared_chars(splits.eval, train, 80) == 0
    assert data.shared_after([held], train, 80) == len(data.normalize(held))  # all of it
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and report.removed_chars["eval_in_train"] > 0
    unmarked = _flat(re.sub(r"(?m)^[> ]+", " ", clean.train[0]))
    assert not _shares_window(unmarked, _windows([held], 40), 40), clean.train[0]
    assert clean.train[0].startswith(own_before) and clean.train[0].endswith(own_after)
    assert clean.train[1] == _long("t")
    # The calibration's general train split is cut of it alike (a library's mailing list
    # quoting the domain's documentation).
    monkeypatch.setattr(data, "eval_document_count", lambda tokenizer, docs, max_tokens: 1)
    general = data.general_train_split(None, [_long("g0"), _long("margin"), train[0]], 10, 10**7, [held], 80,
                                       selected_on=[_long("v")])
    assert general.docs == clean.train[:1] and not any(general.shared_after.values())
    # `quote_markers: false` compares the plain texts only: the quoted copy stays, and is
    # then no shared text to the check either.
    kept, report = data.decontaminate(splits, DecontaminateConfig(quote_markers=False))
    assert kept.train == train and report.clean
    # Only the markers that start a line are blanked, each by as many spaces: code keeps its
    # comparisons, and every other character its position (what the cut relies on).
    code = "if a > b:\n    return a >> 2\n  > > quoted\n>>> x = 1\n>= 3"
    assert data.unquoted(code) == "if a > b:\n    return a >> 2\n      quoted\n    x = 1\n = 3"
    assert data.normalize(code) == "if a > b: return a >> 2 > > quoted >>> x = 1 >= 3"  # the plain comparison: as before


def test_case_folding_does_not_depend_on_the_text_around():
    """A held-out paragraph is folded alone, the training text it is copied into as a whole:
    a Greek capital sigma at a word's end folded to ς in one and σ in the other (whenever the
    training text held a Turkish dotted I, whose lower case is two characters)."""
    greek = ("Η ΕΙΣΑΓΩΓΗ ΤΟΥ ΝΟΜΟΣ ΚΑΙ Ο ΚΟΣΜΟΣ ΤΗΣ ΠΟΛΗΣ: ΠΕΡΙΛΗΨΗ ΤΗΣ ΜΕΛΕΤΗΣ ΓΙΑ ΤΟΥΣ ΦΟΙΤΗΤΕΣ ΚΑΙ "
             "ΤΟΥΣ ΚΑΘΗΓΗΤΕΣ ΤΟΥ ΤΜΗΜΑΤΟΣ ΙΣΤΟΡΙΑΣ.")
    for a, b in (("ΝΟΜΟΣ", " İ"), ("ΟΔΟΣ", " και"), ("İ", "ΟΔΟΣ"), ("οδος", " ΟΔΟΣ")):
        assert data.fold_case(a + b) == data.fold_case(a) + data.fold_case(b), (a, b)
    assert data.fold_case("ΣΣ ς σ") == "σσ σ σ"
    for held, train in ((greek, f"Some training text about İstanbul here.\n\n{greek}"),  # the copy was missed
                        (f"{greek} İstanbul.", f"{_long('t')}\n\n{greek} İstanbul.")):  # the stage refused
        splits = data.Splits(train=[train], valid=[_long("v")], eval=[held])
        clean, report = data.decontaminate(splits, DecontaminateConfig())
        assert report.before["eval_in_train"].paragraphs == 1 and report.clean
        assert "ΚΟΣΜΟΣ" not in " ".join(clean.train)


def _lines(tag: str, n: int) -> list[str]:
    """n distinct lines of a text without blank lines, each under 80 characters."""
    return [f"Line {i} of the {tag} text says one short thing about {tag} {i}." for i in range(n)]


def test_part_of_a_held_out_paragraph_of_many_lines_is_found_inside_a_training_paragraph():
    """A held-out text without blank lines is one paragraph: a copy of 16 of its 30 lines,
    re-wrapped inside a training paragraph, held no whole held-out paragraph and stayed. Its
    runs of lines are checked too: all but less than two runs at either edge is cut."""
    held = _lines("held", 30)
    own = _lines("own", 6)
    copied = " ".join(held[7:23])  # wrapped otherwise: one line
    train = ["\n".join(own[:3]) + "\n" + copied + "\n" + "\n".join(own[3:]), _long("t")]
    splits = data.Splits(train=train, valid=[_long("v")], eval=["\n".join(held), _long("e")])
    before = data.measure_overlap(splits, 80)["eval_in_train"]
    assert before.paragraphs == 1 and 0 < before.chars < len(_flat(" ".join(held))) and before.checked_paragraphs == 2
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean
    text = _flat(" ".join(clean.train))
    assert not any(_flat(" ".join(held[i:i + 4])) in text for i in range(len(held) - 3))
    assert all(line in text for line in own) and _flat(_long("t")) in text


def test_a_training_paragraph_of_many_lines_whose_part_lies_inside_held_out_text_is_cut_there():
    """The other way round: the held-out text holds some lines of a training paragraph (in
    one long line), so no training passage whole is held-out text, but those lines are."""
    lines = _lines("train", 30)
    held = " ".join(["Held-out words before the copy."] + lines[8:22] + ["And held-out words after it."])
    splits = data.Splits(train=["\n".join(lines), _long("t")], valid=[_long("v")], eval=[held, _long("e")])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and report.shared_after["eval_in_train"] == 0
    assert report.shared_before["eval_in_train"] >= len(_flat(" ".join(lines[8:22])))
    text = _flat(" ".join(clean.train))
    assert not any(_flat(" ".join(lines[i:i + 4])) in text for i in range(8, 19))
    assert all(line in text for line in lines[:7] + lines[23:])


def test_every_tokenizer_file_of_a_local_model_is_part_of_the_data_stage_settings(tiny_llama_dir, tmp_path):
    """The data stage tokenizes with the model's tokenizer: a changed merges.txt or
    tokenizer.model (not JSON) re-runs it; a README does not."""
    import shutil

    from qlora_pipeline.recipe import Recipe
    from qlora_pipeline.stages import build_stages

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "merges.txt").write_text("#version: 0.2\n")

    def data_settings():
        recipe = Recipe.model_validate(tiny_recipe(model, tmp_path, data={"general": None}))
        return next(s.config for s in build_stages(recipe) if s.name == "data")

    before = data_settings()
    (model / "README.md").write_text("notes")
    assert data_settings() == before
    (model / "merges.txt").write_text("#version: 0.2\na b\n")
    assert data_settings() != before


def test_a_training_document_that_is_part_of_a_held_out_paragraph_is_cut():
    """No whole held-out paragraph is in it, but all of its text is held out: its passages
    are found inside the held-out text and cut; one left behind stops the stage."""
    from qlora_pipeline.stages.data import _require_clean

    sentences = [f"Sentence {i} tells the reader something specific about topic {i} in plenty of words."
                 for i in range(8)]
    held = [" ".join(sentences[:6]), _long("h")]  # one long paragraph, then another document
    part = " ".join(sentences[1:4])
    splits = data.Splits(train=[part.replace(" ", "\n", 4), _long("t")], valid=[_long("v")], eval=held)
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and clean.train == [_long("t")]
    assert all(n == 0 for n in report.as_dict()["shared_chars_after"].values())
    left = data.Decontamination(report.after, report.after, {}, {}, {}, {"eval_in_train": 85})
    with pytest.raises(DataError, match=r"eval_in_train: 85 character\(s\) in stretches the held-out text also holds"):
        _require_clean(splits, left, DecontaminateConfig())


def test_document_chars_enters_the_data_fingerprint_only_when_set():
    """Unset (the default), the data stage's settings are what they were before the setting
    existed; set, it is part of them (other documents, other splits)."""
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "smollm2_domain.yaml"

    def data_settings(*overrides):
        (spec,) = [s for s in build_stages(load_recipe(recipe, list(overrides))[0]) if s.name == "data"]
        return spec.config["data"]

    plain = data_settings()
    assert "document_chars" not in plain["domain"] and "document_chars" not in plain["general"]
    assert data_settings("data.domain.document_chars=4000")["domain"]["document_chars"] == 4000


def test_part_of_a_long_one_line_paragraph_is_cut_wherever_it_is_copied():
    """A held-out paragraph of one long line (a JSON Lines record, a Markdown paragraph) has no
    smaller passage to search for: a training paragraph that quotes all of it but its last
    word, behind words of its own, or a copy split mid-word between two training documents,
    held no whole held-out paragraph and stayed. Every shared stretch of 80+ characters is
    cut; the training text's own words around it stay."""
    rnd = random.Random("one line")
    held = " ".join(rnd.choice(_VOCABULARY) for _ in range(250)) + "."  # about 1,900 characters, one line
    quoted = held.rsplit(" ", 1)[0]
    own, after = "My own introduction to it, in words of my own.", "And my own last remark."
    cut_at = held.index(" ", 900) - 3  # inside a word
    train = [f"{own} {quoted} {after}", f"{_long('a')}\n\n{held[:cut_at]}", f"{held[cut_at:]}\n\n{_long('b')}"]
    splits = data.Splits(train=train, valid=[_long("v")], eval=[held, _long("e")])
    assert data.measure_overlap(splits, 80)["eval_in_train"].paragraphs == 0  # no whole paragraph found
    assert data.shared_chars(splits.eval, splits.train, 80) > 2 * len(held) - 20
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and report.shared_before["eval_in_train"] > 2 * len(held) - 20
    assert clean.train == [f"{own}\n\n{after}", _long("a"), _long("b")]


def test_text_of_a_script_without_spaces_re_wrapped_is_still_found():
    """Japanese is written without spaces: a line break between two of its characters is no
    word break, so a held-out paragraph re-wrapped at other characters in a training document
    compared as different text when line breaks became spaces."""
    held = ("日本語の文章は単語の間に空白を入れずに書かれるので、改行の位置が変わると別の文字列に見えてしまう。"
            "そのため、評価用の段落が学習用の文書の中に別の幅で折り返されて入っていても、同じ文章として見つけなければならない。")
    wrapped = "\n".join(held[i:i + 25] for i in range(0, len(held), 25))
    assert data.normalize(wrapped) == data.normalize(held)
    assert data.normalize("an English line\nand the next") == "an english line and the next"
    splits = data.Splits(train=[f"{_long('t')}\n\n{wrapped}\n\n{_long('u')}"], valid=[_long("v")], eval=[held])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and clean.train == [f"{_long('t')}\n\n{_long('u')}"]


def test_bidirectional_marks_slipped_into_a_copy_do_not_hide_it():
    held = _long("marked")
    marked = held.replace(" ", " \u200e", 3).replace("paragraph", "para\u202agraph\u202c")
    assert data.normalize(marked) == data.normalize(held)
    splits = data.Splits(train=[f"Before it. {marked} After it.", _long("t")], valid=[_long("v")], eval=[held])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and clean.train == ["Before it.\n\nAfter it.", _long("t")]


def test_general_documents_after_those_general_eval_reads_are_not_held_out(tiny_llama_dir, tmp_path, write_recipe,
                                                                          monkeypatch):
    """Only the general documents general_eval's tokens come from are held out: a domain
    training document that a later, unevaluated general document also holds stays."""
    docs = [_long("e0"), _long("v1"), _long("t2"), _long("e3"), _long("t4"), _long("v5")]
    text, report = _data_stage_with_general_text(
        tiny_llama_dir, tmp_path, write_recipe, monkeypatch, docs,
        {"a.txt": " ".join(f"word{i}" for i in range(3000)),  # general_eval's 4,000 tokens
         "b.txt": f"{_long('g')}\n\n{docs[4]}"})
    assert text["domain_train"] == f"{docs[2]}\n\n{docs[4]}"
    assert _long("g") not in text["general_eval"]
    assert report["before"]["general_eval_in_train"]["checked_paragraphs"] == 1  # a.txt alone


def test_a_text_file_not_utf8_past_its_start_or_with_nul_bytes_is_named(tmp_path):
    """Preflight reads the start of each file; `datasets` said only that generating the dataset
    failed, naming the folder's first file."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_bytes(("Plain text about the topic.\n\n" * 60000).encode())
    (folder / "doc1.txt").write_bytes((folder / "doc1.txt").read_bytes() + b"caf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"data.domain.path: .*doc1.txt is not UTF-8 text \(byte 1740003\)"):
        data.load_documents(DataSource(path=str(folder)), "data.domain")
    for f in folder.iterdir():  # a folder of binary files
        f.write_bytes(b"\0" * 200000)
    with pytest.raises(DataError, match=r"doc0.txt holds NUL bytes at byte 0: not text"):
        data.load_documents(DataSource(path=str(folder)), "data.domain")


def test_a_stretch_through_a_later_copy_of_held_out_boilerplate_is_cut():
    """A 40-character piece repeated more than 64 times in the held-out text was indexed at its
    first 64 places only: a 120-character copy around its 69th, holding no other indexed
    piece, stayed in training with every count at 0 (found by QA)."""
    rnd = random.Random(5)
    boiler = "status report from the nightly build: ok"  # 40 characters
    tails = [f"entry {i:03d} " + "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(26))
             + f"{i * 7:04d}" for i in range(70)]  # 40 characters each: every line is 81
    held = "\n".join(f"{boiler} {t}" for t in tails)
    copy = f"{tails[67][1:]} {boiler} {tails[68][:39]}"
    splits = data.Splits(train=[f"{_long('t')}\n\nMy own words before. {copy} and my own words after."],
                         valid=[_long("v")], eval=[held])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.clean and report.shared_before["eval_in_train"] == len(copy)
    assert not _windows(clean.train) & _windows([held])
    assert clean.train[0].startswith(_long("t")) and clean.train[0].endswith("and my own words after.")


def test_a_copy_of_the_junction_of_two_held_out_documents_is_cut():
    """The end of one held-out document and the start of the next, each under 80 characters:
    the evaluation stream joins them and a window reads both, but the index ended every
    stretch at a document's end, so a training copy of the two together stayed."""
    end, start = "The end of the first held-out note is right here.", "And the second held-out note starts exactly so."
    held = [f"{_long('e0')}\n\n{end}", f"{start}\n\n{_long('e1')}"]
    train = f"{_long('t')}\n\nMy own words first. {end}\n\n{start} Then mine again."
    clean, report = data.decontaminate(data.Splits(train=[train], valid=[_long("v")], eval=held), DecontaminateConfig())
    assert report.clean and not _windows(clean.train) & _windows(["\n\n".join(held)])  # as the stream joins them
    assert end not in clean.train[0] and start not in clean.train[0] and _long("t") in clean.train[0]


def test_shared_characters_before_count_the_whole_shared_stretch():
    """The count before cleaning took the cut's trimmed spans: a copy whose first word is a
    URL in other brackets counted 108 of its 223 shared characters."""
    url = "https://download.example.org/pub/releases/2024/stable/linux-x86_64/toolkit-full-offline-installer-v12.4.7.tar.gz"
    tail = " holds every file that an offline install of the toolkit needs, together with its documentation and examples."
    held = f"{_long('e')}\n\nUse the mirror ({url}){tail}"
    train = f"{_long('t')}\n\nThe archive at <{url}){tail} My own closing words."
    clean, report = data.decontaminate(data.Splits(train=[train], valid=[_long("v")], eval=[held]), DecontaminateConfig())
    assert report.shared_before["eval_in_train"] == len(f"{url}){tail}")
    assert report.clean and clean.train == [f"{_long('t')}\n\nThe archive at <\n\nMy own closing words."]


_HAN = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(120))  # 120 Han characters, no repeats


def _unspaced_leaks(train: list[str], held: str, n: int = 80) -> list[str]:
    """n-character stretches of `held` (Han text) in the training stream, as the stream joins
    documents (a blank line) and with all whitespace gone: a line break between two Han
    characters is no word break."""
    stream = re.sub(r"\s", "", "\n\n".join(train))
    return [held[i:i + n] for i in range(len(held) - n + 1) if held[i:i + n] in stream]


def test_han_text_split_between_two_training_documents_is_cut():
    """The stream joins training documents with a blank line, which between two Han
    characters is no space; the training side's index put a space there, so a held-out Han
    paragraph split between two training documents stayed (each half under 80 characters)."""
    held = [f"{_long('e')}\n\n{_HAN}"]
    train = [f"{_long('t0')}\n\n{_HAN[:60]}", f"{_HAN[60:]}\n\n{_long('t1')}"]
    assert _unspaced_leaks(train, _HAN)
    clean, report = data.decontaminate(data.Splits(train=train, valid=[_long("v")], eval=held), DecontaminateConfig())
    assert report.clean and len(_HAN) <= report.shared_before["eval_in_train"] <= len(_HAN) + 2  # + ". " by chance
    assert not _unspaced_leaks(clean.train, _HAN)
    assert clean.train == [_long("t0"), _long("t1")]


def test_han_text_at_the_junction_of_two_held_out_documents_is_cut():
    """The same on the held-out side: the end of one held-out document and the start of the
    next (50 Han characters each), copied together into a training document."""
    first, second = _HAN[:50], _HAN[50:100]
    held = [f"{_long('e0')}\n\n{first}", f"{second}\n\n{_long('e1')}"]
    train = [f"{_long('t')}\n\n{first}{second}\n\n{_long('t1')}"]
    clean, report = data.decontaminate(data.Splits(train=train, valid=[_long("v")], eval=held), DecontaminateConfig())
    assert report.clean and 100 <= report.shared_before["eval_in_train"] <= 107  # ". " and " The " by chance
    assert not _unspaced_leaks(clean.train, first + second)


@pytest.mark.parametrize("invisible", ["\ufeff", "\u200b", "\u00ad\n\u2060"])
def test_a_document_without_visible_text_does_not_hide_a_copy_across_it(invisible):
    """A training document with nothing visible (an empty file saved with a byte order mark,
    a zero-width space) between two that end and start a held-out sentence: the stream reads
    the sentence across it, but the training side's index held two spaces there."""
    sentence = ("The lanterns were lit one by one along the quay before the harbour bell rang twice at "
                "dusk for the boats.")
    cut = sentence.index(" before")
    held = [f"{_long('e')}\n\n{sentence}"]
    train = [f"{_long('t0')}\n\n{sentence[:cut]}", invisible, f"{sentence[cut + 1:]}\n\n{_long('t1')}"]
    clean, report = data.decontaminate(data.Splits(train=train, valid=[_long("v")], eval=held), DecontaminateConfig())
    assert report.clean and len(sentence) <= report.shared_before["eval_in_train"] <= len(sentence) + 2
    assert not _windows(["\n\n".join(clean.train)]) & _windows(held)


def test_a_held_out_ruler_line_among_many_is_cut_although_the_index_samples_repeats_sparsely():
    """A code corpus's held-out files hold hundreds of ruler comments (`# ----...---- # name`):
    the stretch index keeps a much-repeated k-gram at a few of its copies only, so the one
    ruler line a training file copied escaped the cut, and the check after cleaning (which
    searches the passages verbatim) refused the corpus: "held-out text is still in the
    training side" at 40 MB of Python sources (found by the data-scale benchmark)."""
    # Lines of 82 characters, 83 apart in the index's text, sampled every 41: line 201's first
    # sampled k-gram (40 characters) starts 4 characters in, all dashes, as do its neighbours
    # 20 further on; its next one runs into the line after it.
    names = [random.Random(i).choice("bcdfghjklmnpqrstvwxz") + f"{random.Random(i).getrandbits(40):010x}"
             for i in range(300)]  # 11 characters, no two alike in their first few
    rulers = [f"# {'-' * 66} # {name}" for name in names]
    held = "\n\n".join(rulers)
    copied = rulers[201]
    splits = data.Splits(train=[f"{_long('one')}\n\n{copied}\n\n{_long('two')}"], valid=[_long("v")], eval=[held])
    clean, report = data.decontaminate(splits, DecontaminateConfig())
    assert report.before["eval_in_train"].paragraphs == 1
    assert report.clean and clean.train == [f"{_long('one')}\n\n{_long('two')}"]


@pytest.mark.parametrize("block", [3, 1 << 21])
def test_the_prefix_hash_search_finds_what_a_plain_search_finds(monkeypatch, block):
    """`prefix_matches` (needles of few words) against one `str.find` per needle, overlapping
    occurrences included, on random text of few characters (many repeats, rulers, Han, a
    character beyond the BMP), with needles both shorter and longer than the hashed prefix,
    and with the text hashed in blocks of 3 characters (matches across every block edge) as
    well as in the real blocks."""
    from qlora_pipeline import shared_text

    monkeypatch.setattr(shared_text, "_BLOCK", block)
    rng = random.Random(0)
    alphabet = ["-", "a", "b", " ", "é", "漢", "😀"]
    for case in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        longest = 50 if case % 2 else 90  # odd cases: every needle longer than the 32 hashed
        needles = {text[i:i + rng.randint(1, longest)] for i in (rng.randrange(len(text) or 1) for _ in range(4))}
        needles |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))}
        if case % 2:
            needles = {n for n in needles if len(n) > data._PREFIX_CHARS} or {text[:40] + "-"}
        needles.discard("")
        expected = [o for n in needles for o in plain_occurrences(text, n)]
        assert sorted(data.prefix_matches(text, sorted(needles))) == sorted(expected)


def test_reading_a_local_folder_draws_no_download_or_generation_bars(tmp_path, capfd):
    """`datasets` drew "Downloading data: N files" (nothing is downloaded) and "Generating
    train split" bars for a local folder; they are off while it reads, and back on after."""
    import datasets

    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"document {i}\n")
    assert data.load_documents(DataSource(path=str(tmp_path)), "data.domain") == [f"document {i}\n" for i in range(3)]
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Generating" not in err, err
    assert datasets.is_progress_bar_enabled()


def test_a_general_train_split_is_cut_of_what_the_checks_find(monkeypatch):
    """`general_train_split` cut with one index of all held-out text, then checked each
    held-out text on its own: ruler comments that the index keeps at some copies only were
    left and the check refused the corpus. Now each text is also cut on its own, and what the
    verbatim check finds is cut too (found by review)."""
    monkeypatch.setattr(data, "eval_document_count", lambda tokenizer, docs, max_tokens: 1)
    names = [random.Random(i).choice("bcdfghjklmnpqrstvwxz") + f"{random.Random(i).getrandbits(40):010x}"
             for i in range(300)]
    rulers = [f"# {'-' * 66} # {name}" for name in names]
    general = [_long("g0"), _long("margin")] + [f"{_long(f'one{i}')}\n\n{r}\n\n{_long(f'two{i}')}"
                                                for i, r in enumerate(rulers[195:205])]
    split = data.general_train_split(None, general, 10, 10**7, ["\n\n".join(rulers)], 80, selected_on=[_long("v")])
    assert not any(o.paragraphs for o in split.overlap_after.values()) and not any(split.shared_after.values())
    assert split.docs == [f"{_long(f'one{i}')}\n\n{_long(f'two{i}')}" for i in range(10)]
