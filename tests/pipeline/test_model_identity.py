"""The model a stage was made from is named by its files' content: another checkpoint of the
same shapes copied over the old one, with its size and mtime kept (`cp -p`, `touch -r`), makes
every stage that read it stale; the hashes are remembered while a file is unchanged on disk."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from qlora_pipeline import file_hashes, rundir
from qlora_pipeline.errors import DataError
from tests.conftest import cli, tiny_recipe


def _rewrite_same_size_and_mtime(path, flip_at: int) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[flip_at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_weights_replaced_with_size_and_mtime_kept_make_base_stale(tiny_llama_dir, tmp_path, write_recipe,
                                                                   monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(model, tmp_path, tracking={"enabled": False}))
    assert cli("run", str(recipe), "--only", "data") == 0
    assert cli("run", str(recipe), "--only", "base") == 0
    capsys.readouterr()
    assert cli("plan", str(recipe)) == 0
    assert re.search(r"\bbase\s+skip", capsys.readouterr().out)

    weights = model / "model.safetensors"
    _rewrite_same_size_and_mtime(weights, flip_at=weights.stat().st_size - 3)  # a weight's last byte
    assert cli("plan", str(recipe)) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bbase\s+run\s+.*settings changed: weights\.files\.model\.safetensors", out), out


def test_a_moved_model_keeps_its_identity(tiny_llama_dir, tmp_path):
    """Content, not location: the same files elsewhere are the same model (the stage cache's
    entries serve a copy of the checkpoint)."""
    from qlora_pipeline.models import source_identity
    from qlora_pipeline.recipe import ModelConfig

    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_llama_dir, copy)
    assert source_identity(ModelConfig(source=str(copy))) == source_identity(ModelConfig(source=str(tiny_llama_dir)))


def test_a_moved_model_is_the_same_model_to_every_stage(tiny_llama_dir, tmp_path, write_recipe, monkeypatch, capsys):
    """The recipe pointed at a copy of the model elsewhere: data, base and evaluate-base were
    stale ('settings changed: model.source') and a new run directory found nothing in the stage
    cache, although the README said a moved copy is the same model. The stages read it from its
    new place (runtime setting), and a model that is not the same files is still another model."""
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(model, tmp_path, tracking={"enabled": False})
    path = write_recipe(recipe)
    for stage in ("data", "base"):
        assert cli("run", str(path), "--only", stage) == 0
    moved = model.rename(tmp_path / "moved-model")
    recipe["model"]["source"] = str(moved)
    moved_path = write_recipe(recipe, "moved.yaml")
    capsys.readouterr()
    assert cli("plan", str(moved_path)) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bdata\s+skip", out) and re.search(r"\bbase\s+skip", out), out
    assert cli("run", str(moved_path), "--only", "evaluate-base") == 0  # reads the model where it is now
    manifest = json.loads((tmp_path / "runs" / "tiny" / "base" / "manifest.json").read_text())
    assert str(moved) not in json.dumps(manifest["config"]) and "model" in manifest["config"]
    # Other weights at the moved path are another model.
    _rewrite_same_size_and_mtime(moved / "model.safetensors", flip_at=(moved / "model.safetensors").stat().st_size - 3)
    assert cli("plan", str(moved_path)) == 0
    assert re.search(r"\bbase\s+run\s+.*settings changed: weights", capsys.readouterr().out)


def test_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("QLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_hashes, "MEMO_MIN_BYTES", 100)
    hashed = []
    real = rundir.sha256_file
    monkeypatch.setattr(rundir, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)

    first = file_hashes.sha256_of(f)
    assert file_hashes.sha256_of(f) == first and hashed == ["w.bin", "w.bin"], "written just now: not remembered"

    monkeypatch.setattr(file_hashes, "_now_ns", lambda: time.time_ns() + 10 * 10**9)  # now it is settled
    hashed.clear()
    assert file_hashes.sha256_of(f) == first and file_hashes.sha256_of(f) == first
    assert hashed == ["w.bin"], "hashed once, then remembered"
    assert (tmp_path / "cache" / file_hashes.MEMO_FILE).is_file()

    time.sleep(0.05)  # past the file system's timestamp tick
    _rewrite_same_size_and_mtime(f, flip_at=10)
    hashed.clear()
    assert file_hashes.sha256_of(f) != first and hashed == ["w.bin"], "same size and mtime, new ctime: hashed again"


def test_small_files_are_hashed_every_time_and_never_fill_the_memo(tmp_path, monkeypatch):
    """A corpus of thousands of small documents would otherwise push a model's entries out."""
    monkeypatch.setenv("QLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_hashes, "_now_ns", lambda: time.time_ns() + 10 * 10**9)
    monkeypatch.setattr(file_hashes, "MEMO_MIN_BYTES", 100)
    hashed = []
    real = rundir.sha256_file
    monkeypatch.setattr(rundir, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    small, large = tmp_path / "doc.txt", tmp_path / "big.txt"
    small.write_bytes(b"s" * 99)
    large.write_bytes(b"l" * 100)
    for _ in range(2):
        assert file_hashes.sha256_files([small, large]) == {small: real(small), large: real(large)}
    assert hashed == ["doc.txt", "big.txt", "doc.txt"]
    memo = json.loads((tmp_path / "cache" / file_hashes.MEMO_FILE).read_text())
    assert len(memo) == 1 and next(iter(memo)).startswith(f"{large.resolve()}|")


def test_a_local_corpus_is_hashed_through_the_memo(tmp_path, monkeypatch):
    """The data stage's identity of a local corpus: content hashes, remembered for large files
    (a plan does not re-read a large corpus), the same digests as hashing directly."""
    from qlora_pipeline.data_identity import content_identity
    from qlora_pipeline.recipe import DataSource

    monkeypatch.setenv("QLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_hashes, "_now_ns", lambda: time.time_ns() + 10 * 10**9)
    monkeypatch.setattr(file_hashes, "MEMO_MIN_BYTES", 100)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("x" * 500)
    (corpus / "sub" / "b.txt").write_text("short")
    expected = {"files": {"a.txt": rundir.sha256_file(corpus / "a.txt"),
                          "sub/b.txt": rundir.sha256_file(corpus / "sub" / "b.txt")}}
    assert content_identity(DataSource(path=str(corpus))) == expected
    hashed = []
    real = rundir.sha256_file
    monkeypatch.setattr(rundir, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    assert content_identity(DataSource(path=str(corpus))) == expected
    assert hashed == ["b.txt"], "the large file came from the memo"


def test_an_unwritable_or_damaged_memo_only_costs_hashing(tmp_path, monkeypatch):
    monkeypatch.setenv("QLP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / file_hashes.MEMO_FILE).write_text("[not, a memo")
    f = tmp_path / "w.bin"
    f.write_bytes(b"b" * 10)
    monkeypatch.setattr(file_hashes, "_now_ns", lambda: time.time_ns() + 10 * 10**9)
    assert file_hashes.sha256_of(f) == rundir.sha256_file(f)


def _hub_cache_with(root, repo_id: str, model_dir, commit: str) -> None:
    """A hub cache (huggingface_hub's layout) whose `main` points at `commit`, holding a copy
    of `model_dir`: what `snapshot_download` leaves behind, read here without the network."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_model_is_named_by_the_commit_its_revision_points_to(tiny_llama_dir, tmp_path, write_recipe,
                                                                   monkeypatch, capsys):
    """`main` moves when the hub repository is updated: the stages made from the old commit
    go stale, with the commit named; a pinned commit is its own identity."""
    from qlora_pipeline.models import hub_commit

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    old, new = "a" * 40, "b" * 40
    _hub_cache_with(hub, "someorg/tiny-llama", tiny_llama_dir, old)
    assert hub_commit("someorg/tiny-llama", None) == old
    assert hub_commit("someorg/tiny-llama", new) == new  # a pinned commit, downloaded or not
    assert hub_commit("someorg/absent", None) == "not downloaded"

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(tmp_path, tmp_path, model={"source": "someorg/tiny-llama"},
                                      tracking={"enabled": False}))
    assert cli("run", str(recipe), "--only", "data") == 0
    assert cli("run", str(recipe), "--only", "base") == 0
    capsys.readouterr()
    assert cli("plan", str(recipe)) == 0
    assert re.search(r"\bbase\s+skip", capsys.readouterr().out)

    _hub_cache_with(hub, "someorg/tiny-llama", tiny_llama_dir, new)  # the repository moved on
    assert cli("plan", str(recipe)) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bdata\s+run\s+.*settings changed: .*weights\.commit", out), out
    assert re.search(r"\bbase\s+run\s+.*settings changed: .*weights\.commit", out), out


def test_a_hub_dataset_is_named_and_loaded_by_the_commit_its_revision_points_to(tiny_llama_dir, tmp_path,
                                                                                write_recipe, monkeypatch, capsys):
    """`main` of a hub dataset moves when the dataset is updated: `run` asks the hub which
    commit it is at (the network call is the one thing replaced here), loads that commit, and
    the data stage made from the old one is stale; offline, the commit found last stands; a
    pinned commit is its own identity. `plan` reads what the last run found and asks nobody."""
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    from qlora_pipeline.data import python_docs
    from qlora_pipeline.data_identity import NOT_RESOLVED, hub_dataset_commit

    monkeypatch.setenv("QLP_CACHE", str(tmp_path / "cache"))
    old, new = "a" * 40, "b" * 40
    texts = {old: python_docs(), new: python_docs()[1:]}  # the update drops a document
    hub = {"main": old}
    loaded = []

    def dataset_info(self, repo_id, revision=None, **kwargs):
        if hub is None:
            raise OfflineModeIsEnabled("offline")
        return type("Info", (), {"sha": hub[revision]})()

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        loaded.append(revision)
        return datasets.Dataset.from_dict({"text": texts[revision]})

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert hub_dataset_commit("someorg/corpus", None) == NOT_RESOLVED
    assert hub_dataset_commit("someorg/corpus", new) == new

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(tiny_llama_dir, tmp_path, data={"domain": {"hub": "someorg/corpus"}},
                                      tracking={"enabled": False}))
    assert cli("run", str(recipe), "--only", "data") == 0
    assert loaded == [old] and hub_dataset_commit("someorg/corpus", None) == old
    tokens = (tmp_path / "runs" / "tiny" / "data" / "output" / "tokens.safetensors").read_bytes()

    hub["main"] = new  # the dataset is updated on the hub
    capsys.readouterr()
    assert cli("plan", str(recipe)) == 0
    assert re.search(r"\bdata\s+skip", capsys.readouterr().out), "plan asks nobody: the last run's commit"
    assert cli("run", str(recipe), "--only", "data") == 0
    assert re.search(r"settings changed: content\.domain\.commit", capsys.readouterr().out)
    assert loaded == [old, new]
    assert (tmp_path / "runs" / "tiny" / "data" / "output" / "tokens.safetensors").read_bytes() != tokens

    hub = None  # offline: the commit found last stands, nothing is loaded again
    assert cli("run", str(recipe), "--only", "data") == 0
    assert loaded == [old, new]

    pinned = write_recipe(tiny_recipe(tiny_llama_dir, tmp_path, data={"domain": {"hub": "someorg/corpus",
                                                                                 "revision": old}},
                                      tracking={"enabled": False}))
    capsys.readouterr()
    assert cli("plan", str(pinned)) == 0
    assert re.search(r"\bdata\s+run\s+.*settings changed: .*content\.domain\.commit", capsys.readouterr().out)
    assert cli("run", str(pinned), "--only", "data") == 0
    assert loaded == [old, new, old]
    assert (tmp_path / "runs" / "tiny" / "data" / "output" / "tokens.safetensors").read_bytes() == tokens


def test_revision_is_for_hub_datasets_only(tmp_path):
    import pytest
    from pydantic import ValidationError

    from qlora_pipeline.recipe import DataSource

    with pytest.raises(ValidationError, match="revision names a version of a hub dataset; it needs hub"):
        DataSource(builtin="python-docs", revision="main")


def _offline_hub(monkeypatch, tmp_path):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.mark.parametrize("section, value, expected", [
    ("data", {"seq_len": 2048}, "data.seq_len: 2048 tokens is longer than the model's context of 1024"),
    ("lora", {"target_modules": ["nonexistent_proj"]}, "lora.target_modules: 'nonexistent_proj' matches no linear"),
])
def test_a_cached_hub_model_is_checked_against_its_config(section, value, expected, tiny_llama_dir, tmp_path,
                                                          write_recipe, monkeypatch, capsys):
    """The same files as a local folder were refused; as a hub id in the local cache `validate`
    said "not checked yet" and `run` went on until training failed (found by QA)."""
    hub = _offline_hub(monkeypatch, tmp_path)
    _hub_cache_with(hub, "someorg/tiny-llama", tiny_llama_dir, "a" * 40)
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(tmp_path, tmp_path, model={"source": "someorg/tiny-llama"},
                                      tracking={"enabled": False}, **{section: value}))
    for command in ("validate", "plan", "run"):
        assert cli(command, str(recipe)) == 2, command
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_a_cached_hub_snapshot_missing_its_tokenizer_is_named(tiny_llama_dir, tmp_path, write_recipe, monkeypatch,
                                                               capsys):
    """The data stage failed (exit 1, "Couldn't instantiate the backend tokenizer") and left a
    run directory (found by QA)."""
    hub = _offline_hub(monkeypatch, tmp_path)
    _hub_cache_with(hub, "someorg/tiny-llama", tiny_llama_dir, "a" * 40)
    snapshot = hub / "models--someorg--tiny-llama" / "snapshots" / ("a" * 40)
    (snapshot / "tokenizer.json").unlink()
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(tmp_path, tmp_path, model={"source": "someorg/tiny-llama"},
                                      tracking={"enabled": False}))
    assert cli("run", str(recipe), "--only", "data") == 2
    err = capsys.readouterr().err
    assert f"model.source: {snapshot}" in err and "tokenizer" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_a_stage_loads_the_hub_commit_its_settings_name():
    """A stage loaded what `main` named when it started: moved since planning (another run's
    download), the base of one commit was recorded, and cached, as another's (found by QA)."""
    from qlora_pipeline.models import stage_model

    config = {"model": {"source": "someorg/tiny-llama", "revision": None, "dtype": "bfloat16"},
              "weights": {"hub": "someorg/tiny-llama", "revision": None, "commit": "a" * 40}}
    assert stage_model(config, {}).revision == "a" * 40
    config["weights"]["commit"] = "not downloaded"
    assert stage_model(config, {}).revision is None


def test_an_offline_hub_dataset_of_another_commit_is_refused(monkeypatch):
    """Offline, `datasets` loads the newest cached copy whatever the revision: the fingerprint
    named one commit and the tokens came from another (found by QA). The loaded commit is read
    from the cache folder `datasets` names after it."""
    import datasets

    from qlora_pipeline.data import _hub_documents

    class Cached:
        column_names = ["text"]
        cache_files = [{"filename": f"/cache/someorg___corpus/default/0.0.0/{'b' * 40}/corpus-train.arrow"}]

        def __getitem__(self, key):
            return ["a document"]

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Cached())
    with pytest.raises(DataError, match=f"data.domain.hub: 'someorg/corpus' at commit {'a' * 40} .* is not in the "
                                        f"local cache, which holds {'b' * 40}; connect to the hub once"):
        _hub_documents("someorg/corpus", "train", "text", "data.domain", revision="a" * 40)
    assert _hub_documents("someorg/corpus", "train", "text", "data.domain", revision="b" * 40) == ["a document"]
    assert _hub_documents("someorg/corpus", "train", "text", "data.domain", revision="main") == ["a document"]


def test_a_partly_downloaded_hub_model_is_completed_by_run_not_refused(tiny_llama_dir, tmp_path, write_recipe,
                                                                       monkeypatch, capsys):
    """A snapshot holding only config.json and the tokenizer (what a tokenizer lookup, or a
    download stopped half-way, leaves) was checked as a complete folder: every command said
    "no weights" and `run` never downloaded the rest (found in review). `validate` says it is
    not downloaded yet; `run` downloads, then checks."""
    import huggingface_hub

    hub = _offline_hub(monkeypatch, tmp_path)
    commit = "a" * 40
    _hub_cache_with(hub, "someorg/tiny-llama", tiny_llama_dir, commit)
    snapshot = hub / "models--someorg--tiny-llama" / "snapshots" / commit
    (snapshot / "model.safetensors").unlink()
    downloads = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        downloads.append(revision)
        shutil.copy(tiny_llama_dir / "model.safetensors", snapshot / "model.safetensors")
        return str(snapshot)

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe(tmp_path, tmp_path, model={"source": "someorg/tiny-llama"},
                                      tracking={"enabled": False}))
    assert cli("validate", str(recipe)) == 0
    assert "not checked yet: someorg/tiny-llama is not downloaded yet" in capsys.readouterr().out
    # Offline, huggingface_hub hands back the partial snapshot: named as such, not "save it with save_pretrained".
    assert cli("run", str(recipe), "--only", "data") == 2
    err = capsys.readouterr().err
    assert "the local hub cache holds someorg/tiny-llama only in part" in err and "HF_HUB_OFFLINE unset" in err, err
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)  # online: the download completes it
    assert cli("run", str(recipe), "--only", "data") == 0 and downloads
