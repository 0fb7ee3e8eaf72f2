"""MLflow tracking against a SQLite store and a real `mlflow server` on 127.0.0.1."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from qlora_pipeline.errors import InputError, StageError
from qlora_pipeline.graph import StageResult, StageSpec
from qlora_pipeline.runner import Runner
from qlora_pipeline.tracking import Tracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url, proc
    stop(proc)


def stop(proc) -> None:
    """Kill the server and its worker processes (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def specs(log, crash=None, on_b=None):
    def a(ctx):
        ctx.metrics.log_metrics({"loss": 1.5}, step=1)
        (ctx.output_dir / "a.txt").write_text("a")
        return StageResult(metrics={"a_metric": 3.0})

    def b(ctx):
        if on_b:
            on_b()
        if crash and not (ctx.checkpoint_dir / "half").exists():
            (ctx.checkpoint_dir / "half").write_text("1")
            raise RuntimeError("crash in b")
        ctx.metrics.log_metrics({"loss": 0.5}, step=2)
        (ctx.output_dir / "b.txt").write_text("b")
        return StageResult(metrics={"b_metric": 4.0})

    return [StageSpec("a", a, (), {}), StageSpec("b", b, ("a",), {})]


def run_pipeline(run_dir, uri, **kw):
    tracker = Tracker(uri, "test-exp")
    Runner(run_dir, specs(None, **kw), tracker=tracker, params={"nf4.blocksize": "64"}).run()
    return tracker


def child_runs(client, parent_id):
    runs = client.search_runs([client.get_experiment_by_name("test-exp").experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def check_store(uri, run_dir):
    import json

    client = MlflowClient(uri)
    parent_id = json.loads((run_dir / "run.json").read_text())["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.params["nf4.blocksize"] == "64"
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent_id)
    assert set(children) == {"a", "b"}
    assert children["a"].data.metrics["a_metric"] == 3.0
    assert children["b"].data.metrics["b_metric"] == 4.0
    manifest = json.loads((run_dir / "b" / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] == children["b"].info.run_id
    return client, parent_id


def test_sqlite_store_parent_and_nested_children(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_pipeline(tmp_path / "run", uri)
    check_store(uri, tmp_path / "run")


def test_resumed_stage_continues_its_child_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(StageError):
        run_pipeline(tmp_path / "run", uri, crash=True)
    client = MlflowClient(uri)
    failed_b = [r for r in client.search_runs([client.get_experiment_by_name("test-exp").experiment_id])
                if r.data.tags.get("stage") == "b"]
    assert len(failed_b) == 1 and failed_b[0].info.status == "FAILED"
    run_pipeline(tmp_path / "run", uri, crash=True)  # the checkpoint lets b pass now
    client, parent_id = check_store(uri, tmp_path / "run")
    children = child_runs(client, parent_id)
    assert children["b"].info.run_id == failed_b[0].info.run_id
    assert len(client.search_runs([client.get_experiment_by_name("test-exp").experiment_id])) == 3


def test_real_mlflow_server(tmp_path, mlflow_server):
    url, _ = mlflow_server
    run_pipeline(tmp_path / "run", url)
    check_store(url, tmp_path / "run")


def test_server_dying_mid_stage_warns_and_the_stage_completes(tmp_path, mlflow_server, caplog):
    url, proc = mlflow_server

    def kill_server():
        stop(proc)

    tracker = Tracker(url, "test-exp")
    with caplog.at_level(logging.WARNING):
        Runner(tmp_path / "run", specs(None, on_b=kill_server), tracker=tracker).run()
    assert (tmp_path / "run" / "b" / "manifest.json").is_file()
    assert "continues without tracking" in caplog.text
    assert tracker.enabled is False


def test_unreachable_server_from_the_start(tmp_path, caplog):
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "test-exp")
    with caplog.at_level(logging.WARNING):
        Runner(tmp_path / "run", specs(None), tracker=tracker).run()
    assert (tmp_path / "run" / "b" / "manifest.json").is_file()
    assert "continues without tracking" in caplog.text


def _refuse():
    raise InputError("data.domain: bad input found by the stage")


def test_bad_input_in_an_existing_run_dir_leaves_no_mlflow_runs(tmp_path):
    """A stage refusing its input puts its folder back; the MLflow runs this command made for
    it (and a parent made for nothing that is kept) go too: the store is as it was."""
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    # The run directory exists from a run without tracking: this command makes a new parent.
    Runner(run_dir, specs(None)[:1]).run()
    before = (run_dir / "run.json").read_bytes()
    with pytest.raises(InputError):
        run_pipeline(run_dir, uri, on_b=_refuse)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("test-exp")
    assert client.search_runs([experiment.experiment_id]) == [], "no parent, no child for b"
    assert (run_dir / "run.json").read_bytes() == before and not (run_dir / "b").exists()

    # With stages that finish first (a, after its settings changed), those are kept with their
    # parent; only b's run goes.
    tracker = Tracker(uri, "test-exp")
    changed = specs(None, on_b=_refuse)
    changed[0] = StageSpec("a", changed[0].fn, (), {"changed": 1})
    with pytest.raises(InputError):
        Runner(run_dir, changed, tracker=tracker, params={"nf4.blocksize": "64"}).run()
    runs = client.search_runs([experiment.experiment_id])
    parent_id = json.loads((run_dir / "run.json").read_text())["mlflow_parent_run_id"]
    assert {r.data.tags.get("stage") for r in runs} == {None, "a"} and parent_id in {r.info.run_id for r in runs}
