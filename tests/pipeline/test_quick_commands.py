"""`validate`, `plan` and `status` import only what they need (no torch, transformers, peft or
MLflow): the stage graph names its stage functions by module (`StageRef`) and the code hash
reads their source. And `validate` refuses template placeholders and says what needs the network."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.codehash import code_files
from qlora_pipeline.graph import StageRef
from qlora_pipeline.recipe import load_recipe
from qlora_pipeline.stages import build_stages
from tests.conftest import REPO, cli

HEAVY = ("torch", "transformers", "peft", "mlflow", "datasets", "bitsandbytes", "accelerate", "safetensors")
SMOLLM2 = str(REPO / "recipes" / "smollm2_domain.yaml")
SMOLLM2_METHODS = str(REPO / "recipes" / "smollm2_methods.yaml")  # the default plus the AWQ entries
LLAMA3 = str(REPO / "recipes" / "llama3_domain.yaml")


def imported_by(*args: str) -> tuple[int, list[str]]:
    """(exit code, heavy modules imported) of `pipeline ARGS` in a fresh interpreter."""
    code = ("import json, sys\nfrom qlora_pipeline.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    rc, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return rc, heavy


def test_validate_plan_and_status_import_no_heavy_library(tmp_path):
    recipe, _ = load_recipe(SMOLLM2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json")}))
    for args in (["validate", SMOLLM2], ["plan", SMOLLM2, "--run-dir", str(tmp_path / "none")],
                 ["status", str(run_dir)]):
        assert imported_by(*args) == (0, []), args


def test_stage_functions_are_named_by_module_and_hashed_without_importing():
    recipe, _ = load_recipe(SMOLLM2_METHODS)
    specs = {s.name: s for s in build_stages(recipe)}
    modules = {name: spec.module for name, spec in specs.items()}
    assert modules["train"] == "qlora_pipeline.stages.train"
    assert modules["evaluate-gptq-w4g64"] == modules["evaluate-base"] == "qlora_pipeline.stages.evaluate"
    assert modules["quantize-awq-w4g64"] == "qlora_pipeline.stages.quantize"
    assert modules["awq-search-w4g64"] == "qlora_pipeline.stages.awq_search"
    for spec in specs.values():
        assert isinstance(spec.fn, StageRef)
        files = code_files(spec.fn)
        assert files == code_files(spec.module)  # a module name works the same
        assert "pipeline/" + spec.module.removeprefix("qlora_pipeline.").replace(".", "/") + ".py" in files


@pytest.mark.parametrize("path", [SMOLLM2, SMOLLM2_METHODS])
def test_every_stage_of_the_default_recipes_resolves_to_a_function_of_its_module(path):
    recipe, _ = load_recipe(path)
    for spec in build_stages(recipe):
        fn = spec.fn.resolve()
        assert callable(fn) and fn.__module__ == spec.module, spec.name


def test_stage_ref_resolves_to_the_function_it_names():
    from qlora_pipeline.stages import report

    ref = StageRef("qlora_pipeline.stages.report")
    assert ref.resolve() is report.run
    assert code_files(ref) == code_files(report.run)  # the same fingerprint as before the registry was lazy
    assert ref.call is None
    from qlora_pipeline.stages import evaluate

    built = StageRef("qlora_pipeline.stages.evaluate", "evaluation_stage", ("merged", "load_merged"))
    assert built.call == "evaluation_stage('merged', 'load_merged')" and callable(built.resolve())
    assert built.resolve().__module__ == evaluate.__name__


def test_the_registry_s_choice_of_stage_function_is_part_of_the_stage_s_code():
    """The registry picks an evaluation's artifact label and loader: naming another (a label
    the metrics carry, another loader) left every fingerprint as it was, so `plan` called the
    stage up to date and the stage cache served the old output (found by QA)."""
    from qlora_pipeline.codehash import changed_files
    from qlora_pipeline.graph import StageSpec, fingerprint
    from qlora_pipeline.runner import Runner

    def spec(*args):
        return StageSpec("evaluate-merged", StageRef("qlora_pipeline.stages.evaluate", "evaluation_stage", args),
                         ("data", "merge"), {})

    a, b, c = spec("merged", "load_merged"), spec("merged-bf16", "load_merged"), spec("merged", "load_base_nf4")
    codes = [Runner._read_code(s) for s in (a, b, c)]
    assert changed_files(codes[0], codes[1]) == [
        "stage function evaluation_stage('merged', 'load_merged') -> evaluation_stage('merged-bf16', 'load_merged')"]
    assert changed_files(codes[0], codes[2]) == [
        "stage function evaluation_stage('merged', 'load_merged') -> evaluation_stage('merged', 'load_base_nf4')"]
    digests = {"data": "d", "merge": "m"}
    assert len({fingerprint(s, code, digests) for s, code in zip((a, b, c), codes)}) == 3
    plain = StageSpec("report", StageRef("qlora_pipeline.stages.report"), (), {})
    assert "stage function" not in Runner._read_code(plain)  # the modules' `run`: code tables as before


def test_quantize_rules_are_the_ones_the_stage_uses():
    from qlora_pipeline import methods
    from qlora_pipeline.stages import quantize

    assert quantize.check_shapes is methods.check_shapes


# ------------------------------------------------------------------------------- validate


def write(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_validate_lists_what_needs_the_network(tmp_path, capsys):
    recipe = write(tmp_path, {
        "model": {"source": "meta-llama/Meta-Llama-3-8B", "revision": "main"},
        "data": {"domain": {"hub": "someorg/contracts", "split": "train"},
                 "general": {"hub": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"}},
        "run": {"dir": str(tmp_path / "runs")},
    })
    assert cli("validate", recipe) == 0
    out = capsys.readouterr().out.splitlines()
    network = [line for line in out if line.startswith("needs the network: ")]
    assert len(network) == 3
    assert network[0].startswith("needs the network: model.source: hub model meta-llama/Meta-Llama-3-8B at revision main")
    assert "data.domain.hub: hub dataset someorg/contracts, split train" in network[1]
    assert "data.general.hub: hub dataset Salesforce/wikitext, config wikitext-2-raw-v1, split test" in network[2]


def test_validate_of_local_sources_needs_no_network(tmp_path, capsys):
    assert cli("validate", SMOLLM2) == 0
    assert "needs the network" not in capsys.readouterr().out


@pytest.mark.parametrize("section, key", [
    ({"data": {"domain": {"hub": "your-org/your-domain-corpus"}}}, "data.domain.hub"),
    ({"data": {"domain": {"hub": "<org>/<dataset>"}}}, "data.domain.hub"),
    ({"data": {"general": {"hub": "YOUR_ORG/wiki"}}}, "data.general.hub"),
    ({"model": {"source": "your-org/your-model"}}, "model.source"),
])
def test_placeholders_are_refused_by_key(tmp_path, capsys, section, key):
    assert cli("validate", write(tmp_path, section)) == 2
    err = capsys.readouterr().err
    assert f"{key}: '" in err and "is a placeholder" in err


def test_local_paths_must_exist(tmp_path, capsys):
    recipe = write(tmp_path, {"data": {"domain": {"path": str(tmp_path / "missing")}},
                              "tracking": {"uri": f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"}})
    assert cli("validate", recipe) == 2
    err = capsys.readouterr().err
    assert f"data.domain: path '{tmp_path / 'missing'}' does not exist" in err


def test_a_sqlite_store_in_a_missing_folder_is_refused(tmp_path, capsys):
    recipe = write(tmp_path, {"tracking": {"uri": f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"}})
    assert cli("validate", recipe) == 2
    assert f"tracking.uri: folder {tmp_path / 'nowhere'} of the SQLite store mlflow.db does not exist" in \
        capsys.readouterr().err


def test_hub_config_needs_a_hub_dataset(tmp_path, capsys):
    recipe = write(tmp_path, {"data": {"domain": {"builtin": "python-docs", "config": "x"}}})
    assert cli("validate", recipe) == 2
    assert "config names a configuration of a hub dataset; it needs hub" in capsys.readouterr().err


def test_llama3_recipe_is_refused_until_its_corpus_is_named(tmp_path, capsys):
    assert cli("validate", LLAMA3) == 2
    err = capsys.readouterr().err
    assert "data.domain.hub: 'your-org/your-domain-corpus' is a placeholder" in err
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The supplier shall deliver the goods within thirty days.\n")
    assert cli("validate", LLAMA3, "--set", f"data.domain={{path: {corpus}}}") == 0
    out = capsys.readouterr().out
    assert "needs the network: model.source: hub model meta-llama/Meta-Llama-3-8B" in out
    assert "needs the network: data.general.hub: hub dataset Salesforce/wikitext, config wikitext-2-raw-v1" in out
    assert "data.domain" not in out.split("ok (", 1)[1]


def test_every_option_of_every_command_says_what_it_does():
    """`pipeline COMMAND --help` explains each option (plan's --from/--only/--force once had none)."""
    import click

    from qlora_pipeline.cli import cli as group

    missing = [f"{name} {'/'.join(param.opts)}" for name, command in group.commands.items()
               for param in command.params
               if isinstance(param, click.Option) and not param.help]
    assert missing == []
