"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent global "active run"),
so a resumed stage can continue its own child run. A tracking failure never fails a stage:
the first error is reported once as a warning and tracking is switched off for the rest of
the process; the stage's metrics still land in its manifest.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from qlora_pipeline.stages import report

logger = logging.getLogger(__name__)

# MLflow 3 records what an experiment is for in this tag (its UI infers and writes one when it
# is missing). This is a model-training experiment: the UI's "Machine learning" kind. (Which
# page MLflow 3.17's UI opens also follows its GenAI / Model training switch, which a URL sets
# with `workflowType`: see `runs_url`.)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The run's description in the MLflow UI (rendered as markdown).
NOTE_TAG = "mlflow.note.content"
RUN_NAME_LIMIT = 250  # MLflow stores run names in a VARCHAR(250)
# The runs table shows no metric columns until someone picks them. The pipeline keeps a view
# (MLflow's "shared view": an experiment tag holding the UI state, opened by a URL parameter)
# whose columns are the report's figures of the parent runs; `pipeline ui` links to it.
VIEW_KEY = "pipeline-report"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_METRICS = ("domain_ppl", "general_ppl")  # per artifact, in the report's artifact order
EXPERIMENT_TAG_LIMIT = 5000  # the longest experiment tag value older MLflow servers take (3.17: 20000)
NOTE_LIMIT = 5000  # the longest run tag value older MLflow servers take (3.17: 8000)

# Fail fast instead of MLflow's default minutes of retries when the server is down.
_FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def default_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def runs_url(base_url: str, experiment_id: Optional[str], view: bool = False) -> str:
    """The MLflow UI page listing an experiment's runs (MLflow 3's UI routes with `#/`), in
    its model-training layout, with the report's columns when `view` (see VIEW_TAG); the UI's
    home page when the experiment does not exist yet."""
    base = base_url.rstrip("/")
    if not experiment_id:
        return f"{base}/"
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={VIEW_KEY}" if view else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def report_columns(run_dir: Path) -> list[str]:
    """The parent-run metrics the runs table shows: `<artifact>.<metric>` for VIEW_METRICS,
    from the report's `metrics.json` (empty when there is no report)."""
    try:
        artifacts = json.loads(report.metrics_path(Path(run_dir)).read_text())["artifacts"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f"{name}.{metric}" for metric in VIEW_METRICS for name, m in artifacts.items()
            if isinstance(m, dict) and metric in m]


def view_state(previous: Optional[str], metric_keys: list[str]) -> str:
    """The view's JSON: the columns of `metric_keys` first, then those of earlier runs (`previous`)
    while they fit in an experiment tag."""
    try:
        old = json.loads(previous).get("selectedColumns", []) if previous else []
    except (ValueError, AttributeError):
        old = []
    columns = [f"metrics.`{k}`" for k in metric_keys]
    columns += [c for c in old if isinstance(c, str) and c not in columns]
    while columns and len(json.dumps({"selectedColumns": columns})) > EXPERIMENT_TAG_LIMIT:
        columns.pop()
    return json.dumps({"selectedColumns": columns})


def parent_run_name(recipe_name: str, run_dir: Path) -> str:
    """The parent run's name in MLflow: which recipe, run where (`smollm2_domain @ runs/smollm2_domain`)."""
    try:
        where = Path(run_dir).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        where = Path(run_dir).as_posix()
    name = f"{recipe_name} @ {where}"
    return name if len(name) <= RUN_NAME_LIMIT else name[: RUN_NAME_LIMIT - 1] + "…"


def report_note(run_dir: Path, limit: int = NOTE_LIMIT) -> Optional[str]:
    """The parent run's description: the report's headline table (`report/output/report.md`),
    as markdown, with where the full report is. None when there is no report."""
    path = report.metrics_path(Path(run_dir)).with_name(report.REPORT_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return None
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    title = next((line.lstrip("# ").strip() for line in lines if line.startswith("# ")), f"Report: {Path(run_dir).name}")
    after = next((line for line in lines[end:] if line.strip()), "")  # the sentence on what was evaluated
    note = [f"**{title}**", "", *lines[start:end], ""]
    if after and not after.startswith("#"):
        note += [after, ""]
    note.append(f"Full report (generations, plots): `{path}`, also among the artifacts of the `report` stage's run.")
    out = "\n".join(note)
    return out if len(out) <= limit else out[: limit - 1] + "…"


class Tracker:
    """A failure-tolerant handle on one MLflow tracking store."""

    def __init__(self, uri: Optional[str], experiment: str, enabled: bool = True, parent_name: Optional[str] = None):
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self.parent_name = parent_name  # the parent run's name (default: what the runner passes)
        self._client = None
        self._experiment_id: Optional[str] = None
        self._new_store: Optional[Path] = None  # the SQLite file this process created, if any
        if enabled:
            for k, v in _FAST_FAIL_ENV.items():
                os.environ.setdefault(k, v)
            self._guard("connect", self._connect)

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        from qlora_pipeline.preflight import sqlite_store_path

        store = sqlite_store_path(self.uri or default_tracking_uri())
        existed = store is None or store.exists()
        self._client = MlflowClient(tracking_uri=self.uri)
        self.uri = self._client.tracking_uri
        self._experiment_id = ensure_experiment(self._client, self.experiment)
        if not existed and store.is_file():
            self._new_store = store

    def discard_new_store(self) -> None:
        """Delete the SQLite store this process created (its experiment and runs with it): called
        when the run that created it is refused for bad input, which must leave nothing behind."""
        store, self._new_store = self._new_store, None
        if store is None:
            return
        try:  # MLflow keeps the store and its engine per URI: drop them, or this process would
            # write to the deleted file on its next run
            from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
            from mlflow.tracking._tracking_service.utils import _tracking_store_registry

            for kind in (SqlAlchemyStore, RegistryStore):
                engine = kind._engine_map.pop(self.uri, None)
                if engine is not None:
                    engine.dispose()
            _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
        except Exception:  # another MLflow version: the file still goes
            pass
        self.enabled = False
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{store}{suffix}").unlink(missing_ok=True)

    @property
    def experiment_id(self) -> Optional[str]:
        return self._experiment_id

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any tracking failure: warn once, keep working
            self.enabled = False
            logger.warning(
                "MLflow tracking failed during %s (%s: %s); the pipeline continues without tracking. "
                "Results are still in the run directory's manifests.",
                what, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "",
            )
            return None

    # -- runs -------------------------------------------------------------------------------

    def parent_run(self, existing_id: Optional[str], name: str, params: dict[str, str], tags: dict[str, str]) -> Optional[str]:
        """Continue `existing_id` if it still exists, else create the pipeline's parent run."""

        name = self.parent_name or name

        def go() -> str:
            if existing_id and self._run_exists(existing_id):
                self._client.update_run(existing_id, status="RUNNING", name=name)
                return existing_id
            run = self._client.create_run(self._experiment_id, run_name=name, tags=tags)
            self._log_params(run.info.run_id, params)
            return run.info.run_id

        return self._guard("creating the parent run", go)

    def child_run(self, parent_id: Optional[str], existing_id: Optional[str], stage: str) -> Optional[str]:
        """Continue a stage's child run after a resume, or open a new nested one."""

        def go() -> str:
            if existing_id and self._run_exists(existing_id):
                self._client.update_run(existing_id, status="RUNNING")
                return existing_id
            tags = {"stage": stage}
            if parent_id:
                tags["mlflow.parentRunId"] = parent_id
            return self._client.create_run(self._experiment_id, run_name=stage, tags=tags).info.run_id

        return self._guard(f"opening the run of stage {stage}", go)

    def finish(self, run_id: Optional[str], status: str = "FINISHED") -> None:
        if run_id:
            self._guard("closing a run", self._client.set_terminated, run_id, status)

    def delete(self, run_id: Optional[str]) -> None:
        """Remove a run this process created (a run abandoned because its input was bad)."""
        if run_id:
            self._guard("deleting a run", self._client.delete_run, run_id)

    def _run_exists(self, run_id: str) -> bool:
        try:
            run = self._client.get_run(run_id)
        except Exception:
            return False
        return run.info.lifecycle_stage == "active"

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[i : i + 100])

    # -- logging ------------------------------------------------------------------------------

    def logger_for(self, run_id: Optional[str]) -> "RunLogger":
        return RunLogger(self, run_id)

    def log_metrics(self, run_id: Optional[str], metrics: dict[str, float], step: Optional[int] = None) -> None:
        if not run_id or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._guard("logging metrics", self._client.log_batch, run_id, metrics=batch)

    def log_artifact(self, run_id: Optional[str], path: Path, artifact_path: Optional[str] = None) -> None:
        if run_id:
            self._guard("logging an artifact", self._client.log_artifact, run_id, str(path), artifact_path)

    def set_tags(self, run_id: Optional[str], tags: dict[str, str]) -> None:
        if run_id:
            for k, v in tags.items():
                self._guard("setting a tag", self._client.set_tag, run_id, k, v)

    def set_note(self, run_id: Optional[str], markdown: Optional[str]) -> None:
        """The run's description in the MLflow UI (markdown)."""
        if run_id and markdown:
            self._guard("setting the run description", self._client.set_tag, run_id, NOTE_TAG, markdown)

    def show_columns(self, metric_keys: list[str]) -> None:
        """Add `metric_keys` (parent-run metrics) to the experiment's report view (VIEW_TAG)."""
        if not metric_keys or self._experiment_id is None:
            return

        def go() -> None:
            previous = self._client.get_experiment(self._experiment_id).tags.get(VIEW_TAG)
            self._client.set_experiment_tag(self._experiment_id, VIEW_TAG, view_state(previous, metric_keys))

        self._guard("updating the runs view", go)


def planned_artifact_folder(uri: Optional[str], experiment: str) -> tuple[Optional[Path], bool]:
    """(where the runs of `experiment` in the store at `uri` will write their artifacts, when
    that is a folder of this machine; whether the experiment exists already), found by reading
    only, before a run creates anything. An existing experiment keeps the folder it was made
    with; a new one in a SQLite store gets MLflow's default, `./mlruns` of the folder the
    command starts in, and in a file store the store's own folder. (None, False) for a server
    or another database, whose artifact store this cannot see, and for a store it cannot read
    (the tracker says why)."""
    from qlora_pipeline.preflight import sqlite_store_path

    uri = uri or default_tracking_uri()
    store = sqlite_store_path(uri)
    if store is None:
        folder = local_path(uri) if "://" not in uri or uri.startswith("file:") else None  # a file store
        return (folder.expanduser() if folder else None), False
    if store.is_file():
        for k, v in _FAST_FAIL_ENV.items():
            os.environ.setdefault(k, v)
        try:
            from mlflow.tracking import MlflowClient

            found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
        except Exception:
            return None, False
        if found is not None:
            return local_path(found.artifact_location), True
    return Path.cwd() / "mlruns", False


def local_path(location: Optional[str]) -> Optional[Path]:
    """The folder an MLflow artifact location names on this machine (a plain path or a file:
    URI); None for remote locations (mlflow-artifacts:, s3://, http://...)."""
    if not location:
        return None
    if location.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(location).path))
    return None if ":" in location.split("/", 1)[0] else Path(location)


def find_experiment(uri: Optional[str], name: str) -> tuple[Optional[str], bool]:
    """(the id of experiment `name` in the store at `uri`, whether it has the report view), tagged
    as a model-training experiment on the way; (None, False) when it does not exist or the
    store cannot be read."""
    for k, v in _FAST_FAIL_ENV.items():
        os.environ.setdefault(k, v)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            return None, False
        return ensure_experiment(client, name), VIEW_TAG in exp.tags
    except Exception as exc:  # the UI still starts; it shows what the store holds
        logger.warning("could not read experiment '%s' from %s (%s: %s)", name, uri, type(exc).__name__,
                       str(exc).splitlines()[0][:200] if str(exc) else "")
        return None, False


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created if missing, tagged as a model-training experiment
    (also when it exists already: MLflow's UI may have tagged it with a kind it inferred)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


class RunLogger:
    """The `MetricLogger` a stage sees: bound to its child run, never raises."""

    def __init__(self, tracker: Tracker, run_id: Optional[str]):
        self.tracker = tracker
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_artifact(self, path: Path) -> None:
        self.tracker.log_artifact(self.run_id, path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tracker.set_tags(self.run_id, tags)
