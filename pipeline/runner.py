"""The stage runner: decides what is up to date, runs what is not, and records the results.

A stage is skipped when its manifest's fingerprint matches and its files verify. Changing a
setting changes that stage's fingerprint and, through the fingerprint chain, every stage
downstream of it; nothing else re-runs. An interrupted stage keeps its `checkpoints/` and
resumes from them when its fingerprint is unchanged.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from pipeline import rundir
from pipeline.errors import InputError, StageError
from pipeline.graph import StageContext, StageResult, StageSpec, downstream_of, fingerprint, topological
from pipeline.tracking import Tracker

logger = logging.getLogger(__name__)

CKPT_FINGERPRINT = ".fingerprint"


@dataclass
class PlannedStage:
    spec: StageSpec
    fingerprint: str
    action: str  # "run" | "skip"
    reason: str
    status: str  # done | stale | partial | failed | missing | corrupt


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


def code_version() -> str:
    """`git describe` of the checkout this code runs from, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlora-pipeline")
    except PackageNotFoundError:
        return "unknown"


class Ranks:
    """The processes of an `accelerate launch` / torchrun launch (one process when not launched so).

    Only the main process takes the lock, writes manifests and talks to MLflow; the others
    wait at a barrier while it runs a stage, and join in for `distributed` stages.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._state = None
        if self.world > 1:
            from datetime import timedelta

            import torch
            from accelerate import PartialState

            # Long timeout: the other ranks wait while the main process runs whole stages.
            self._state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


class Runner:
    def __init__(self, run_dir: Path, specs: list[StageSpec], recipe, tracker: Optional[Tracker] = None,
                 recipe_dump: Optional[dict] = None, params: Optional[dict[str, str]] = None):
        self.run_dir = Path(run_dir)
        self.specs = topological(specs)
        self.by_name = {s.name: s for s in self.specs}
        self.recipe = recipe
        self.tracker = tracker
        self.recipe_dump = recipe_dump or {}
        self.params = params or {}

    # ------------------------------------------------------------------------------ planning

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def inspect(self, spec: StageSpec, fp: str, full_verify: bool = False) -> tuple[str, str]:
        """(status, reason) of a stage on disk against fingerprint `fp`."""
        sdir = self.stage_dir(spec.name)
        manifest = rundir.read_json(sdir / rundir.MANIFEST)
        state = rundir.read_json(sdir / rundir.STATE) or {}
        if manifest is not None:
            if manifest.get("fingerprint") != fp:
                changed = _changed_keys(manifest.get("config", {}), spec.config)
                if changed:
                    return "stale", f"settings changed: {', '.join(changed[:6])}"
                if manifest.get("version") != spec.version:
                    return "stale", f"stage code changed (version {manifest.get('version')} -> {spec.version})"
                return "stale", "an upstream stage changed"
            problems = rundir.verify_files(sdir / rundir.OUTPUT, manifest.get("files", {}), full=full_verify)
            if problems:
                return "corrupt", f"output does not match its manifest: {problems[0]}"
            return "done", "up to date"
        if state.get("status") == "failed" and state.get("fingerprint") == fp:
            return "failed", f"failed: {state.get('error', '?')}"
        if state.get("status") == "running" and state.get("fingerprint") == fp and state.get("host") == socket.gethostname() \
                and rundir._alive(int(state.get("pid", -1)), None):
            return "running", f"running in pid {state['pid']} since {state.get('started')}"
        ckpt = sdir / rundir.CHECKPOINTS
        if (ckpt / CKPT_FINGERPRINT).is_file() and (ckpt / CKPT_FINGERPRINT).read_text().strip() == fp:
            n = sum(1 for p in ckpt.iterdir() if p.name != CKPT_FINGERPRINT)
            if n == 0:
                return "partial", "interrupted before its first checkpoint; restarts"
            return "partial", f"interrupted; resumes from {n} checkpoint file(s)"
        return "missing", "not run yet"

    def plan(self, from_stage: Optional[str] = None, only: Optional[str] = None, force: bool = False,
             full_verify: bool = False) -> list[PlannedStage]:
        for name in (from_stage, only):
            if name is not None and name not in self.by_name:
                raise InputError(f"unknown stage '{name}'; stages of this recipe: {', '.join(self.by_name)}")
        forced: set[str] = set()
        if from_stage:
            forced = downstream_of(self.specs, from_stage)
        if force:
            forced = {only} if only else set(self.by_name)

        fps: dict[str, str] = {}
        planned: list[PlannedStage] = []
        will_run: set[str] = set()
        for spec in self.specs:
            fp = fingerprint(spec, fps)
            fps[spec.name] = fp
            status, reason = self.inspect(spec, fp, full_verify)
            if only and spec.name != only:
                action = "skip"
                reason = f"{status}: {reason} (not selected by --only)"
            elif spec.name in forced:
                action, reason = "run", "forced" + (" (--from)" if from_stage and not force else "")
            elif status == "done" and not will_run.intersection(spec.deps):
                action = "skip"
            else:
                action = "run"
            if action == "run":
                will_run.add(spec.name)
            planned.append(PlannedStage(spec, fp, action, reason, status))

        if only:
            target = next(p for p in planned if p.spec.name == only)
            missing = [p.spec.name for p in planned if p.spec.name in target.spec.deps and p.status != "done"]
            if missing:
                raise InputError(
                    f"--only {only}: its upstream stage(s) {', '.join(missing)} are not done; "
                    f"run them first (drop --only, or use --from {missing[0]})"
                )
        return planned

    # ------------------------------------------------------------------------------ running

    def run(self, from_stage: Optional[str] = None, only: Optional[str] = None, force: bool = False) -> list[PlannedStage]:
        ranks = Ranks()
        planned = self.plan(from_stage, only, force)
        ranks.barrier()  # every rank has planned from the same state before anything is written
        if not ranks.is_main:
            self._follow(planned, ranks)
            return planned
        with rundir.RunLock(self.run_dir / ".lock"):
            run_json = rundir.read_json(self.run_dir / "run.json") or {}
            parent_id = None
            if self.tracker:
                parent_id = self.tracker.parent_run(
                    run_json.get("mlflow_parent_run_id"), self.run_dir.name, self.params,
                    tags={"run_dir": str(self.run_dir.resolve()), "code_version": code_version()},
                )
            run_json.update({
                "recipe": self.recipe_dump,
                "mlflow_parent_run_id": parent_id or run_json.get("mlflow_parent_run_id"),
                "tracking_uri": self.tracker.uri if self.tracker else None,
                "code_version": code_version(),
                "stages": [s.name for s in self.specs],
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            rundir.write_json_atomic(self.run_dir / "run.json", run_json)
            try:
                for p in planned:
                    if p.action == "skip":
                        logger.info("%-22s skip  (%s)", p.spec.name, p.reason)
                        continue
                    self._run_stage(p, parent_id, ranks)
                    ranks.barrier()
            except BaseException:
                if self.tracker:
                    self.tracker.finish(parent_id, "FAILED")
                raise
            if self.tracker:
                self.tracker.finish(parent_id, "FINISHED")
        return planned

    def _follow(self, planned: list[PlannedStage], ranks: Ranks) -> None:
        """A non-main rank: wait while the main process runs each stage; join distributed ones."""
        for p in planned:
            if p.action == "skip":
                continue
            ranks.barrier()  # the main process has prepared the stage's directories
            if p.spec.distributed:
                sdir = self.stage_dir(p.spec.name)
                scratch = sdir / f"output.rank{ranks.rank}"
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(parents=True)
                ctx = StageContext(
                    name=p.spec.name, config=p.spec.config, recipe=self.recipe,
                    inputs={d: self.stage_dir(d) / rundir.OUTPUT for d in p.spec.deps}, output_dir=scratch,
                    checkpoint_dir=sdir / rundir.CHECKPOINTS, metrics=_NullLogger(), progress=_progress,
                    run_dir=self.run_dir,
                )
                try:
                    p.spec.fn(ctx)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            ranks.barrier()  # the main process has published the stage

    def _run_stage(self, p: PlannedStage, parent_id: Optional[str], ranks: Optional[Ranks] = None) -> StageResult:
        spec, fp = p.spec, p.fingerprint
        sdir = self.stage_dir(spec.name)
        sdir.mkdir(parents=True, exist_ok=True)
        state = rundir.read_json(sdir / rundir.STATE) or {}
        ckpt = sdir / rundir.CHECKPOINTS
        fp_file = ckpt / CKPT_FINGERPRINT
        if ckpt.exists() and (not fp_file.is_file() or fp_file.read_text().strip() != fp):
            shutil.rmtree(ckpt)  # progress of a different configuration: not ours to resume
        ckpt.mkdir(exist_ok=True)
        rundir.write_bytes_atomic(fp_file, fp.encode())
        partial = sdir / rundir.PARTIAL
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()

        child_id = None
        if self.tracker:
            previous = state.get("mlflow_run_id") if state.get("fingerprint") == fp else None
            child_id = self.tracker.child_run(parent_id, previous, spec.name)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rundir.write_json_atomic(sdir / rundir.STATE, {
            "fingerprint": fp, "status": "running", "started": started, "pid": os.getpid(),
            "host": socket.gethostname(), "mlflow_run_id": child_id,
        })
        if ranks is not None:
            ranks.barrier()  # directories ready: the other ranks may start (or keep waiting)
        inputs = {d: self.stage_dir(d) / rundir.OUTPUT for d in spec.deps}
        metric_logger = self.tracker.logger_for(child_id) if self.tracker else _NullLogger()
        ctx = StageContext(
            name=spec.name, config=spec.config, recipe=self.recipe, inputs=inputs, output_dir=partial,
            checkpoint_dir=ckpt, metrics=metric_logger, progress=_progress, run_dir=self.run_dir,
        )
        logger.info("%-22s run   (%s)", spec.name, p.reason)
        t0 = time.time()
        try:
            result = spec.fn(ctx) or StageResult()
        except BaseException as exc:
            err = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            rundir.write_json_atomic(sdir / rundir.STATE, {
                "fingerprint": fp, "status": "failed", "started": started, "error": err, "mlflow_run_id": child_id,
            })
            if self.tracker:
                self.tracker.finish(child_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            if isinstance(exc, (InputError, KeyboardInterrupt)):
                raise
            raise StageError(f"stage {spec.name} failed: {err}") from exc
        seconds = time.time() - t0

        # Publish: drop the old manifest first so no manifest ever points at a half-swapped output.
        (sdir / rundir.MANIFEST).unlink(missing_ok=True)
        rundir.fsync_dir(sdir)
        out = rundir.publish_output(sdir)
        metrics = {**result.metrics, "stage_seconds": round(seconds, 3)}
        manifest = {
            "stage": spec.name,
            "fingerprint": fp,
            "version": spec.version,
            "config": spec.config,
            "inputs": {d: (rundir.read_json(self.stage_dir(d) / rundir.MANIFEST) or {}).get("fingerprint") for d in spec.deps},
            "files": rundir.describe_files(out),
            "metrics": metrics,
            "info": result.info,
            "mlflow_run_id": child_id,
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        rundir.write_json_atomic(sdir / rundir.MANIFEST, manifest)
        rundir.write_json_atomic(sdir / rundir.STATE, {
            "fingerprint": fp, "status": "done", "started": started, "mlflow_run_id": child_id,
        })
        shutil.rmtree(ckpt, ignore_errors=True)
        if self.tracker:
            self.tracker.log_metrics(child_id, metrics)
            if result.parent_metrics:
                self.tracker.log_metrics(parent_id, result.parent_metrics)
            self.tracker.set_tags(child_id, {"output_dir": str(out.resolve()), "fingerprint": fp})
            self.tracker.finish(child_id, "FINISHED")
        logger.info("%-22s done  in %.1fs", spec.name, seconds)
        return result


class _NullLogger:
    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_artifact(self, path) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass


def _progress(iterable=None, **kwargs):
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("disable", None)  # off when stderr is not a terminal
    return tqdm(iterable, **kwargs)
