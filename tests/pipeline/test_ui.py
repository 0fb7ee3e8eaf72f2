"""What a new user sees in MLflow: the experiment's kind, the parent run's name and description,
the report's metric columns, the runs page `pipeline ui` prints, and (with Chromium) that page
in a real browser."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qlora_pipeline import tracking
from qlora_pipeline.graph import StageResult, StageSpec
from qlora_pipeline.runner import Runner
from qlora_pipeline.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, NOTE_TAG, VIEW_KEY, VIEW_TAG, Tracker,
                               parent_run_name, report_columns, report_note, runs_url, view_state)
from tests.conftest import cli

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "qlora-pipeline"
ARTIFACTS = {
    "base": {"domain_ppl": 13.189, "general_ppl": 9.14, "size_bytes": 541.6e6},
    "merged": {"domain_ppl": 11.159, "general_ppl": 9.859, "size_bytes": 272.6e6},
    "gptq-w4g64": {"domain_ppl": 11.986, "general_ppl": 10.968, "size_bytes": 118.3e6},
}
REPORT_MD = """# Report: demo

Held-out domain text and general text, non-overlapping windows of 512 tokens.

| artifact | domain ppl | general ppl | size (MB) |
|---|---|---|---|
| base | 13.189 | 9.140 | 541.6 |
| merged | 11.159 | 9.859 | 272.6 |
| gptq-w4g64 | 11.986 | 10.968 | 118.3 |

Evaluated on cpu in float32; 16863 domain tokens, 16352 general tokens.

## Plots

![ppl_vs_size](ppl_vs_size.png)
"""


def report_stage(ctx):
    """What the report stage leaves behind: report.md, metrics.json, parent metrics."""
    (ctx.output_dir / "report.md").write_text(REPORT_MD)
    (ctx.output_dir / "metrics.json").write_text(json.dumps({"artifacts": ARTIFACTS, "gate": {}}))
    flat = {f"{a}.{k}": v for a, m in ARTIFACTS.items() for k, v in m.items()}
    return StageResult(metrics=flat, parent_metrics=flat)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one takes seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def finished_run(tmp_path: Path, uri: str, experiment: str, recipe_name: str = "demo") -> Runner:
    """A finished pipeline run (one report stage) tracked in `experiment`, described as
    `pipeline run` describes its parent run."""
    from qlora_pipeline.cli import _describe_parent_run

    run_dir = tmp_path / "runs" / recipe_name
    tracker = Tracker(uri, experiment, parent_name=parent_run_name(recipe_name, run_dir))
    runner = Runner(run_dir, [StageSpec("report", report_stage, (), {})], tracker=tracker)
    runner.run()
    _describe_parent_run(runner)
    return runner


def parent_id(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["mlflow_parent_run_id"]


# ------------------------------------------------------------------------------- the experiment


def test_a_new_experiment_is_a_model_training_experiment(store):
    tracker = Tracker(store, "new")
    exp = MlflowClient(store).get_experiment(tracker.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


@pytest.mark.parametrize("tags", [{}, {EXPERIMENT_KIND_TAG: "genai_development_inferred"}])
def test_an_existing_experiment_is_tagged_when_reused(store, tags):
    client = MlflowClient(store)
    name = f"existing-{len(tags)}"
    experiment_id = client.create_experiment(name, tags=tags)
    assert Tracker(store, name).experiment_id == experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


# ------------------------------------------------------------------------------- the parent run


def test_parent_run_name_description_and_report_columns(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = finished_run(tmp_path, store, "described")
    client = MlflowClient(store)
    run = client.get_run(parent_id(runner.run_dir))
    assert run.info.run_name == "demo @ runs/demo"
    note = run.data.tags[NOTE_TAG]
    assert note.startswith("**Report: demo**")
    assert "| gptq-w4g64 | 11.986 | 10.968 | 118.3 |" in note and "## Plots" not in note
    assert "16863 domain tokens" in note and str(runner.run_dir / "report" / "output" / "report.md") in note
    assert run.data.metrics["gptq-w4g64.domain_ppl"] == 11.986
    view = json.loads(client.get_experiment(runner.tracker.experiment_id).tags[VIEW_TAG])
    assert view["selectedColumns"][:3] == ["metrics.`base.domain_ppl`", "metrics.`merged.domain_ppl`",
                                           "metrics.`gptq-w4g64.domain_ppl`"]
    assert "metrics.`gptq-w4g64.general_ppl`" in view["selectedColumns"]


def test_a_resumed_run_takes_the_new_name(tmp_path, store):
    run_dir = tmp_path / "run"
    specs = [StageSpec("report", report_stage, (), {})]
    Runner(run_dir, specs, tracker=Tracker(store, "resumed")).run()
    first = parent_id(run_dir)
    assert MlflowClient(store).get_run(first).info.run_name == "run"  # the runner's default: the folder
    Runner(run_dir, specs, tracker=Tracker(store, "resumed", parent_name="recipe @ run")).run()
    assert parent_id(run_dir) == first
    assert MlflowClient(store).get_run(first).info.run_name == "recipe @ run"


def test_report_note_and_columns_without_a_report(tmp_path):
    assert report_note(tmp_path) is None
    assert report_columns(tmp_path) == []


def test_parent_run_name_is_short_enough_for_mlflow(tmp_path):
    name = parent_run_name("r", tmp_path / ("x" * 400))
    assert len(name) == tracking.RUN_NAME_LIMIT and name.startswith("r @ ")


def test_view_state_keeps_earlier_columns_within_the_tag_limit():
    first = view_state(None, ["a.domain_ppl", "b.domain_ppl"])
    second = json.loads(view_state(first, ["c.domain_ppl", "a.domain_ppl"]))["selectedColumns"]
    assert second == ["metrics.`c.domain_ppl`", "metrics.`a.domain_ppl`", "metrics.`b.domain_ppl`"]
    many = view_state(None, [f"artifact-{i:04d}.domain_ppl" for i in range(500)])
    assert len(many) <= tracking.EXPERIMENT_TAG_LIMIT
    assert json.loads(many)["selectedColumns"][0] == "metrics.`artifact-0000.domain_ppl`"
    assert json.loads(view_state("not json", ["a.x"])) == {"selectedColumns": ["metrics.`a.x`"]}


# ------------------------------------------------------------------------------- pipeline ui


def test_runs_url_forms():
    assert runs_url("http://127.0.0.1:5000/", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert runs_url("http://h:1", "3", view=True) == \
        f"http://h:1/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    assert runs_url("http://h:1", None) == "http://h:1/"


def test_ui_on_a_server_prints_and_opens_its_runs_page(tmp_path, monkeypatch, capsys):
    """A tracking server serves its own UI: `pipeline ui` names the page (and opens it) only."""
    opened = []
    monkeypatch.setattr(tracking, "find_experiment", lambda uri, name: ("7", True))
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    assert cli("ui", "--uri", "http://127.0.0.1:5999", "--open") == 0
    url = f"http://127.0.0.1:5999/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    assert f"runs: {url}" in capsys.readouterr().out
    assert opened == [url]


@pytest.mark.parametrize("where", ["here", "a virtual file system"])
def test_ui_without_a_store_says_so_and_creates_none(where, tmp_path, monkeypatch, capsys):
    """MLflow would create an empty store (or, where it cannot, retry for minutes): exit 2 instead."""
    monkeypatch.chdir(tmp_path)
    args = [] if where == "here" else ["--uri", "sqlite:////proc/qlp-none/mlflow.db"]
    assert cli("ui", *args) == 2
    err = capsys.readouterr().err
    store = tmp_path / "mlflow.db" if where == "here" else "/proc/qlp-none/mlflow.db"  # MLflow's default: ./mlflow.db
    assert f"no MLflow store at {store}: `pipeline run` creates it" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_ui_for_a_recipe_that_does_not_track_says_so(tmp_path, monkeypatch, capsys):
    """It said `pipeline run` creates the store, which that recipe's runs never do."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: builtin:smollm2-135m}\ntracking: {enabled: false}\n")
    assert cli("ui", "--recipe", str(recipe)) == 2
    err = capsys.readouterr().err
    assert (f"no MLflow store at {tmp_path / 'mlflow.db'}: {recipe} has tracking.enabled: false, so its runs are "
            "not tracked" in err and "Traceback" not in err), err
    assert list(tmp_path.iterdir()) == [recipe]


def test_ui_on_a_port_in_use_is_refused_before_any_server_starts(tmp_path, monkeypatch, capsys):
    """Another `pipeline ui` (on another store) on the port: it printed our store's URL, which
    the other server answered with its own runs, and exited 0 when its server could not bind."""
    import socket
    import subprocess

    (tmp_path / "mlflow.db").touch()  # a store file: what is judged here is the port
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("a server started"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert cli("ui", "--uri", store, "--port", str(port)) == 2
    out, err = capsys.readouterr()
    assert f"--port {port}: something already listens on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert "runs:" not in out and started == []


def test_find_experiment_tags_the_experiment_and_reports_the_view(tmp_path, store):
    runner = finished_run(tmp_path, store, "found")
    client = MlflowClient(store)
    client.set_experiment_tag(runner.tracker.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    assert tracking.find_experiment(store, "found") == (runner.tracker.experiment_id, True)
    assert client.get_experiment(runner.tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert tracking.find_experiment(store, "resumed")[1] is False  # no report view there
    assert tracking.find_experiment(store, "no-such-experiment") == (None, False)


def _check_ui():
    spec = importlib.util.spec_from_file_location("check_ui", REPO / "scripts" / "check_ui.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_ui"] = module
    spec.loader.exec_module(module)
    return module


check_ui = _check_ui()


@pytest.mark.skipif(check_ui.chromium() is None, reason="needs chromium (apt-get install -y chromium) to load the "
                    "MLflow UI in a real browser")
def test_ui_runs_page_in_a_real_browser(tmp_path, store, monkeypatch):
    """`pipeline ui` prints a runs page that shows the parent run and the report's metric columns
    in MLflow's model-training layout (about 30 s: the server's start and one page load)."""
    monkeypatch.chdir(tmp_path)
    finished_run(tmp_path, store, EXPERIMENT)
    proc, url = check_ui.start_ui(["--uri", store, "--experiment", EXPERIMENT])
    try:
        dom = check_ui.browse(url)
    finally:
        check_ui.stop_ui(proc)
    assert proc.returncode is not None
    metrics = [f"{a}.domain_ppl" for a in ARTIFACTS]
    assert check_ui.page_problems(dom, "demo @ runs/demo", metrics) == []
