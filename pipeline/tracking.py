"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent global "active run"),
so a resumed stage can continue its own child run. A tracking failure never fails a stage:
the first error is reported once as a warning and tracking is switched off for the rest of
the process; the stage's metrics still land in its manifest.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# Fail fast instead of MLflow's default minutes of retries when the server is down.
_FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def default_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


class Tracker:
    """A failure-tolerant handle on one MLflow tracking store."""

    def __init__(self, uri: Optional[str], experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.uri = uri
        self.experiment = experiment
        self._client = None
        self._experiment_id: Optional[str] = None
        if enabled:
            for k, v in _FAST_FAIL_ENV.items():
                os.environ.setdefault(k, v)
            self._guard("connect", self._connect)

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        self.uri = self._client.tracking_uri
        exp = self._client.get_experiment_by_name(self.experiment)
        self._experiment_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment)

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

        def go() -> str:
            if existing_id and self._run_exists(existing_id):
                self._client.update_run(existing_id, status="RUNNING")
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
