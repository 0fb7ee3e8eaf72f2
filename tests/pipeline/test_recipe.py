"""Recipes: every shipped recipe validates; every malformed one exits 2 naming the key, writes nothing."""
from __future__ import annotations


import pytest

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.recipe import Recipe, flatten, load_recipe
from tests.conftest import REPO, cli

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe, _ = load_recipe(path)
    assert recipe.run.name == path.stem
    assert recipe.nf4.double_quant is True


def test_the_methods_recipe_is_the_default_plus_the_awq_entries():
    """recipes/smollm2_methods.yaml promises that after a default run the stage cache serves
    every stage the two share: each of the default's stages (but the report, never cached) has
    the same settings, inputs and code there, so the same fingerprint. A setting changed in one
    recipe and not the other fails here."""
    from qlora_pipeline.stages import build_stages

    default = {s.name: s for s in build_stages(load_recipe(REPO / "recipes" / "smollm2_domain.yaml")[0])}
    methods = {s.name: s for s in build_stages(load_recipe(REPO / "recipes" / "smollm2_methods.yaml")[0])}
    shared = [name for name in default if name != "report"]
    assert set(shared) < set(methods)
    for name in shared:
        a, b = default[name], methods[name]
        assert (a.config, a.deps, a.code, a.runtime, a.module) == (b.config, b.deps, b.code, b.runtime, b.module), name
    added = sorted(set(methods) - set(default))
    assert added == ["awq-search-w4g64", "evaluate-awq-gptq-w4g64", "evaluate-awq-w4g64",
                     "quantize-awq-gptq-w4g64", "quantize-awq-w4g64"]
    assert {q.method for q in load_recipe(REPO / "recipes" / "smollm2_domain.yaml")[0].quantize} == {"rtn", "gptq"}


def test_llama3_recipe_has_the_real_settings():
    r, _ = load_recipe(REPO / "recipes" / "llama3_domain.yaml")
    assert r.model.source == "meta-llama/Meta-Llama-3-8B"
    assert (r.lora.r, r.lora.target_modules, r.train.optimizer) == (16, "all-linear", "paged_adamw_8bit")
    assert (r.calibration.samples, r.calibration.seq_len) == (256, 2048)
    methods = {q.method: q for q in r.quantize}
    assert {"awq", "gptq"} <= set(methods)
    assert all(methods[m].bits == 4 and methods[m].group_size == 128 for m in ("awq", "gptq"))


def test_defaults_are_defined_once_in_the_schema(write_recipe):
    recipe, _ = load_recipe(write_recipe({}))
    assert recipe == Recipe(run={"name": "recipe"})
    assert recipe.model.source == "builtin:smollm2-135m"


def test_overrides(write_recipe):
    path = write_recipe({"quantize": [{"name": "g", "method": "gptq"}]})
    recipe, _ = load_recipe(path, ["nf4.blocksize=128", "quantize.0.group_size=64", "run.name=x", "tracking.enabled=false"])
    assert recipe.nf4.blocksize == 128 and recipe.quantize[0].group_size == 64
    assert recipe.run.name == "x" and recipe.tracking.enabled is False
    assert flatten(recipe)["quantize.g.group_size"] == "64"



def test_a_setting_a_method_does_not_read_is_accepted_at_its_default():
    """Written out at its default it changes nothing (the quantize stage rebuilds its entry from
    a config that names every setting); only a value that would be ignored is refused."""
    from qlora_pipeline import methods
    from qlora_pipeline.recipe import QuantizeEntry

    for name in methods.METHODS:
        entry = QuantizeEntry(name="q", method=name)
        assert QuantizeEntry.model_validate(methods.relevant_settings(entry)) == entry
    assert QuantizeEntry(name="r", method="rtn", desc_act=False, awq={}).desc_act is False


def test_a_star_sets_the_key_on_every_list_item(write_recipe):
    path = write_recipe({"quantize": [{"name": "g", "method": "awq+gptq"}, {"name": "a", "method": "awq"}]})
    recipe, _ = load_recipe(path, ["quantize.*.compute_dtype=bfloat16", "quantize.*.awq.search_windows=2"])
    assert [q.compute_dtype for q in recipe.quantize] == ["bfloat16", "bfloat16"]
    assert [q.awq.search_windows for q in recipe.quantize] == [2, 2]


def test_a_star_skips_the_entries_whose_method_does_not_read_the_key(write_recipe, capsys):
    """`quantize.*.compute_dtype` means the entries with calibration forwards, not also a
    round-to-nearest entry that would refuse it; a key no entry reads is refused."""
    path = write_recipe({"quantize": [{"name": "r", "method": "rtn"}, {"name": "g", "method": "gptq"},
                                      {"name": "a", "method": "awq"}]})
    recipe, _ = load_recipe(path, ["quantize.*.compute_dtype=bfloat16", "quantize.*.awq.search_windows=2",
                                   "quantize.*.desc_act=true"])
    assert [q.compute_dtype for q in recipe.quantize] == ["auto", "bfloat16", "bfloat16"]
    assert [q.desc_act for q in recipe.quantize] == [False, True, False]
    assert recipe.quantize[2].awq.search_windows == 2
    with pytest.raises(RecipeError, match=r"--set quantize\.\*\.nf4\.blocksize: no entry of quantize reads nf4"):
        load_recipe(path, ["quantize.*.nf4.blocksize=128"])

BAD = {
    "unknown top-level key": ({"modle": {}}, "modle: unknown key. Did you mean 'model'?"),
    "unknown nested key": ({"nf4": {"blocksise": 64}}, "nf4.blocksise: unknown key. Did you mean 'nf4.blocksize'?"),
    "wrong type": ({"data": {"seq_len": "long"}}, "data.seq_len: Input should be a valid integer"),
    "bad blocksize": ({"nf4": {"blocksize": 48}}, "nf4.blocksize"),
    "group size 0": ({"quantize": [{"name": "q", "method": "gptq", "group_size": 0}]}, "quantize.0.group_size"),
    "unknown method": ({"quantize": [{"name": "q", "method": "gguf"}]}, "quantize.0.method"),
    "duplicate quantize names": ({"quantize": [{"name": "q", "method": "rtn"}, {"name": "q", "method": "gptq"}]},
                                 "quantize: names must be unique (each names its stage and artifact); repeated: 'q' at "
                                 "quantize.0.name, quantize.1.name"),
    "missing model path": ({"model": {"source": "./no/such/model"}}, "model.source: path './no/such/model' does not exist"),
    "missing data path": ({"data": {"domain": {"path": "/no/such/file.txt"}}}, "data.domain: path '/no/such/file.txt' does not exist"),
    "two data sources": ({"data": {"domain": {"builtin": "python-docs", "hub": "x/y"}}}, "data.domain: give exactly one"),
    "negative steps": ({"train": {"steps": -3}}, "train.steps"),
    "warmup over steps": ({"train": {"steps": 5, "warmup_steps": 9}}, "train: warmup_steps (9) exceeds steps (5)"),
    "lora rank 0": ({"lora": {"r": 0}}, "lora.r"),
    "awq 3-bit": ({"quantize": [{"name": "a", "method": "awq", "bits": 3}]}, "quantize.0: AWQ GEMM checkpoints are 4-bit only"),
    "setting rtn does not read": ({"quantize": [{"name": "r", "method": "rtn", "desc_act": True, "damp_percent": 0.05}]},
                                  "quantize.0: method rtn does not use desc_act, damp_percent (it reads bits, group_size, "
                                  "sym, mse); remove them"),
    "setting awq does not read": ({"quantize": [{"name": "a", "method": "awq", "mse": True}]},
                                  "quantize.0: method awq does not use mse"),
    "awq section on gptq": ({"quantize": [{"name": "g", "method": "gptq", "awq": {"clip": False}}]},
                            "quantize.0: method gptq does not read the awq section (methods that do: awq, awq+gptq)"),
    "section not a mapping": ({"nf4": 5}, "nf4: must be a section of keys, not a number (5); its keys: blocksize"),
    "empty section": ({"model": None}, "model: empty section (nothing after 'model:'); give its keys or remove"),
    "true for a number": ({"train": {"steps": True}}, "train.steps: must be a number, not true"),
    "infinite learning rate": ({"train": {"learning_rate": float("inf")}}, "train.learning_rate: Input should be a "
                               "finite number"),
    "empty model source": ({"model": {"source": ""}}, "model.source: empty; give builtin:smollm2-135m"),
    "hub id with spaces": ({"data": {"domain": {"hub": "my corpus"}}}, "data.domain.hub: 'my corpus' is not a hub "
                           "dataset id"),
    "sqlite uri with two slashes": ({"tracking": {"uri": "sqlite://mlflow.db"}}, "a file path takes three slashes"),
    "misspelt tracking scheme": ({"tracking": {"uri": "sqllite:///x.db"}}, "has the unknown scheme 'sqllite://'"),
    "tilde in a sqlite uri": ({"tracking": {"uri": "sqlite:///~/mlflow.db"}}, "MLflow does not expand '~'"),
    "bad run name": ({"run": {"name": "a/b"}}, "run.name"),
    "unknown builtin model": ({"model": {"source": "builtin:gpt5"}}, "model.source: unknown built-in model 'gpt5'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_recipe_exits_2_naming_the_key(case, write_recipe, tmp_path, monkeypatch, capsys):
    data, expected = BAD[case]
    monkeypatch.chdir(tmp_path)
    data = {**data, "run": {**data.get("run", {}), "dir": str(tmp_path / "runs")}} if case != "bad run name" else data
    path = write_recipe(data)
    before = set(tmp_path.iterdir())
    assert cli("run", str(path)) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before, "bad input must write nothing"


@pytest.mark.parametrize("version, allowed, refused", [("3.17.2", "", True), ("3.17.2", "true", False),
                                                        ("2.16.0", "", False)])
def test_a_file_store_uri_is_refused_where_mlflow_refuses_it(version, allowed, refused, write_recipe, monkeypatch,
                                                             capsys):
    from qlora_pipeline import preflight

    monkeypatch.setattr(preflight, "_mlflow_version", lambda: version)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", allowed)
    path = write_recipe({"tracking": {"uri": "http//localhost:5000"}})  # the ':' forgotten: a folder path
    assert cli("validate", str(path)) == (2 if refused else 0)
    err = capsys.readouterr().err
    assert ("tracking.uri: 'http//localhost:5000' names MLflow's file store" in err) == refused, err


def test_empty_data_files_are_rejected(write_recipe, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.bin").write_bytes(b"\0")
    for src, msg in ((tmp_path / "empty.txt", "is empty"), (tmp_path / "folder", "holds no non-empty")):
        path = write_recipe({"data": {"domain": {"path": str(src)}}})
        assert cli("validate", str(path)) == 2
        assert msg in capsys.readouterr().err


def test_all_problems_reported_at_once(write_recipe, capsys):
    path = write_recipe({"nf4": {"blocksize": 3}, "lora": {"r": -1, "alpah": 2}, "train": {"steps": "x"}})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert len(exc.value.problems) == 4
    assert cli("validate", str(path)) == 2
    assert "4 problems" in capsys.readouterr().err


def test_a_key_given_twice_is_refused_naming_its_lines(tmp_path, capsys):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  steps: 20\nlora: {r: 4}\ntrain:\n  learning_rate: 0.001\n")
    assert cli("validate", str(recipe)) == 2
    assert "line 4, column 1: key 'train' given twice (first at line 1)" in capsys.readouterr().err
    recipe.write_text("train: {steps: 3, steps: 4}\n")
    assert cli("validate", str(recipe)) == 2
    assert "key 'steps' given twice" in capsys.readouterr().err
    # YAML's merge keys repeat keys on purpose: still fine
    recipe.write_text("train: &t {steps: 20, warmup_steps: 2}\ncalibration: {samples: 8}\n")
    assert load_recipe(recipe)[0].train.steps == 20


def test_a_recipe_path_that_is_not_a_regular_file(capsys):
    assert cli("validate", "/dev/null") == 2
    assert "'/dev/null' is not a regular file; give a recipe .yaml file" in capsys.readouterr().err


def test_yaml_syntax_error_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert cli("validate", str(bad)) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    assert cli("validate", str(tmp_path / "nope.yaml")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_set_syntax(write_recipe, capsys):
    path = write_recipe({})
    assert cli("validate", str(path), "--set", "nf4.blocksize") == 2
    assert "expected key.path=value" in capsys.readouterr().err
    assert cli("validate", str(path), "--set", "nf4.blocksize=abc") == 2
    assert "nf4.blocksize" in capsys.readouterr().err


def test_validate_ok_lists_stages(capsys):
    assert cli("validate", str(REPO / "recipes" / "smollm2_domain.yaml")) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "base" in out and "report" in out


def test_run_seed_seeds_train_and_calibration_unless_they_give_their_own(write_recipe):
    """run.seed was read by no stage: a recipe setting it changed nothing."""
    recipe, _ = load_recipe(write_recipe({"run": {"seed": 7}, "train": {"seed": 3}}))
    assert (recipe.run.seed, recipe.train.seed, recipe.calibration.seed) == (7, 3, 7)
    recipe, _ = load_recipe(write_recipe({}))
    assert (recipe.run.seed, recipe.train.seed, recipe.calibration.seed) == (0, 0, 0)
    for written in (7.0, "7"):  # read as 7 by run.seed: so by the sections too (they stayed 0)
        recipe, _ = load_recipe(write_recipe({"run": {"seed": written}}))
        assert (recipe.run.seed, recipe.train.seed, recipe.calibration.seed) == (7, 7, 7)
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe({"run": {"seed": "seven"}}))
    assert len(err.value.problems) == 1 and "run.seed" in err.value.problems[0]


@pytest.mark.parametrize("section, key", [("train", "micro_batch_size"), ("train", "gradient_accumulation"),
                                          ("train", "seed"), ("calibration", "seed"), ("run", "seed")])
def test_a_count_or_seed_past_int64_is_refused_at_its_key(write_recipe, section, key):
    """10^20 passed validation and crashed in training (an index or a seed overflowing int64)."""
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe({section: {key: 10**20}}))
    assert len(err.value.problems) == 1 and f"{section}.{key}" in err.value.problems[0]


@pytest.mark.parametrize("run", [{"dir": ""}, {"cache": {"dir": ""}}])
def test_an_empty_folder_setting_is_refused_not_read_as_the_default(write_recipe, run):
    """run.cache.dir: "" fell back to the user cache folder without a word (and run.dir: "" to
    the current folder)."""
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe({"run": run}))
    assert len(err.value.problems) == 1 and "at least 1 character" in err.value.problems[0]
