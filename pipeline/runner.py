"""The stage runner: decides what is up to date, runs what is not, and records the results.

A stage's fingerprint covers its settings, the code it runs (`codehash`) and the *content* of
its inputs (the output hashes its upstream manifests record). A stage is skipped when its
manifest's fingerprint matches and its files verify. Changing a setting or a source file
re-runs the stages that use it; a downstream stage re-runs only when an upstream output
actually changed: an upstream rebuild that reproduces the same bytes leaves it up to date.
Before a stage runs, the upstream files it reads are hashed against their manifests
(`verify_inputs`); an altered file makes its stage rebuild first, so no stage computes on
altered bytes. An interrupted stage keeps its `checkpoints/` and resumes from them when its
fingerprint is unchanged, unless forced (`--force`, `--from`): then it starts over. A stage whose fingerprint has an entry in the stage cache
(`stagecache`, shared by run directories) takes its output from there instead of running.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from qlora_pipeline import rundir
from qlora_pipeline.codehash import STAGE_CALL_KEY, changed_files, code_files, library_versions
from qlora_pipeline.errors import InputError, StageError, interruption
from qlora_pipeline.graph import StageContext, StageRef, StageResult, StageSpec, downstream_of, fingerprint, output_digest, topological, with_run_dir_name
from qlora_pipeline.runinfo import check_records, record_problem
from qlora_pipeline.stagecache import Entry, StageCache, place_files, short_key, with_mtimes
from qlora_pipeline.tracking import Tracker

logger = logging.getLogger(__name__)

CKPT_FINGERPRINT = ".fingerprint"
CHANGED_WHILE_RUNNING = "changed while the stage ran"  # in a manifest's code table: matches no code


@dataclass
class PlannedStage:
    """One stage of a plan.

    `fingerprint` is None while an upstream stage that runs first may still change this
    stage's inputs; `waits_on` names the upstream stages that run or are restored from the
    cache first: the runner decides again once they are published.
    """

    spec: StageSpec
    fingerprint: Optional[str]
    action: str  # "run" | "skip" | "cache" (restored from the stage cache)
    reason: str
    status: str  # done | stale | partial | failed | missing | corrupt | running
    waits_on: tuple[str, ...] = ()
    forced: bool = False
    outcome: str = ""  # after `run`: ran | skipped | resumed | cached, and seconds
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # after `run`: the process's resident-set high-water mark once the stage ran
    basis: str = ""  # under a "from cache" reason: why the stage is not up to date

    @property
    def settled(self) -> bool:
        """Skipped whatever happens upstream: nothing it depends on changes before its turn."""
        return self.action == "skip" and not self.waits_on


def process_peak_rss() -> int:
    """This process's resident-set high-water mark so far, in bytes (0 where the OS does not say).
    The stage after which it rises is the one that set the peak of a whole run in one process."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def _from_cache(key: str, reason: str) -> str:
    return f"from cache: {short_key(key)} ({reason})"


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


def _disk_full(exc: BaseException) -> Optional[BaseException]:
    """The ENOSPC error behind `exc` (also when a library wrapped it in its own error type)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


ATOMIC_WRITE_TEMPORARY = re.compile(r"\..+\.tmp-\d+")  # `rundir.write_bytes_atomic`'s `.<name>.tmp-<pid>`


def _remove_leftover_atomic_writes(run_dir: Path) -> None:
    """The temporary files of atomic writes (run.json, a stage's state.json or manifest) that a
    process killed between writing and renaming left behind. Called holding the run lock: no
    other process writes here, so every one is a dead writer's."""
    for path in list(run_dir.glob(".*.tmp-*")) + list(run_dir.glob("*/.*.tmp-*")):
        if ATOMIC_WRITE_TEMPORARY.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _remove_temporaries(root: Path) -> None:
    """Delete half-written files (`*.tmp*`, `.tmp` folders) under `root`."""
    if not root.exists():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if ".tmp" in path.name:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
    wait while it runs a stage, and join in for `distributed` stages. What happens to a stage
    is decided by the main process alone and sent to the others (`agree`): a rank that read
    the stage's files itself could find them mid-change (a stage the main process has just
    restored from the cache reads as done) and fall out of step with the main process.
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
            _leave_process_group_at_exit()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def agree(self, value=None):
        """The main process's `value`, on every rank (the others pass nothing); a collective
        call: each rank waits here until the main process has sent it."""
        if self._state is None:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_leaving_registered = False


def _leave_process_group_at_exit() -> None:
    """Close the process group when this process ends, once per process. Left to the
    interpreter's teardown, gloo's threads are destroyed while still joinable when the other
    rank has already gone, and the process can abort ("terminate called without an active
    exception", exit -6) after a run that succeeded (rarely, and more often under load)."""
    global _leaving_registered
    if _leaving_registered:
        return
    _leaving_registered = True
    import atexit

    import torch.distributed as dist

    def leave():
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(leave)


def selection_problem(stage_names: list[str], from_stage: Optional[str], only: Optional[str]) -> Optional[str]:
    """What is wrong with a `--from` / `--only` choice among `stage_names` (None: nothing)."""
    if from_stage is not None and only is not None:
        # The two together have no one meaning: ask rather than guess.
        return (f"--from {from_stage} and --only {only} cannot be combined: --from re-runs a stage and everything "
                "downstream of it, --only runs one stage; give one of them")
    for name in (from_stage, only):
        if name is not None and name not in stage_names:
            return f"unknown stage '{name}'; stages of this recipe: {', '.join(stage_names)}"
    return None


class Runner:
    def __init__(self, run_dir: Path, specs: list[StageSpec], tracker: Optional[Tracker] = None,
                 recipe_dump: Optional[dict] = None, params: Optional[dict[str, str]] = None,
                 verify_inputs: bool = True, cache: Optional[StageCache] = None):
        self.run_dir = Path(run_dir)
        self.specs = topological([with_run_dir_name(s, self.run_dir) for s in specs])
        self.by_name = {s.name: s for s in self.specs}
        self.tracker = tracker
        self.recipe_dump = recipe_dump or {}
        self.params = params or {}
        self.verify_inputs = verify_inputs
        self.cache = cache
        self._code: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------------------ planning

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def code(self, spec: StageSpec) -> dict[str, str]:
        """The code table of `spec` as it was when this runner first planned (`plan` takes every
        stage's before anything runs): the code the process imported, whatever is edited later."""
        if spec.name not in self._code:
            self._code[spec.name] = self._read_code(spec)
        return self._code[spec.name]

    @staticmethod
    def _read_code(spec: StageSpec) -> dict[str, str]:
        files = {**code_files(spec.fn), **library_versions(spec.fn)}
        if isinstance(spec.fn, StageRef) and spec.fn.call:  # the registry's choice of factory and arguments
            files[STAGE_CALL_KEY] = spec.fn.call
        for module in spec.code:
            files.update(code_files(module))
            files.update(library_versions(module))
        return dict(sorted(files.items()))

    def code_changed_while_running(self, spec: StageSpec) -> dict[str, str]:
        """The stage's code table with every entry that differs on disk now from `code(spec)`
        marked as changed; {} when nothing changed. A stage whose source was edited while it ran
        (an editor, a `git checkout`) may have run either version (a module imported before the
        edit, another imported after it), so its record must match neither."""
        before, now = self.code(spec), self._read_code(spec)
        if before == now:
            return {}
        return {**before, **{k: CHANGED_WHILE_RUNNING for k in set(before) | set(now) if before.get(k) != now.get(k)}}

    def manifest(self, name: str) -> Optional[dict]:
        """Stage `name`'s manifest when it is a well-formed record (`runinfo.record_problem`),
        else None: a damaged manifest vouches for nothing. `plan` refuses a run directory with
        one (`runinfo.check_records`), so None here means no manifest."""
        manifest = rundir.read_json(self.stage_dir(name) / rundir.MANIFEST)
        return None if manifest is None or record_problem(rundir.MANIFEST, manifest) else manifest

    def _unbuilt_reason(self, sdir: Path) -> str:
        """Why a stage without a manifest runs: what is on disk, when there is something."""
        if (sdir / rundir.OUTPUT).exists():
            return (f"{self._rel(str(sdir / rundir.OUTPUT))} has no manifest (deleted, or a run killed while "
                    "publishing); not trusted, runs again")
        return "not run yet"

    def input_digests(self, spec: StageSpec, restored: Optional[dict[str, str]] = None) -> dict[str, Optional[str]]:
        """Per upstream stage, the content digest of its published output (None: not published);
        `restored`: the digests of upstream stages the cache is going to restore."""
        out = {}
        for dep in spec.deps:
            if restored and dep in restored:
                out[dep] = restored[dep]
                continue
            manifest = self.manifest(dep)
            out[dep] = output_digest(manifest["files"]) if manifest else None
        return out

    def current_fingerprint(self, spec: StageSpec, restored: Optional[dict[str, str]] = None
                            ) -> tuple[Optional[str], dict[str, Optional[str]]]:
        digests = self.input_digests(spec, restored)
        if any(d is None for d in digests.values()):
            return None, digests
        return fingerprint(spec, self.code(spec), digests), digests

    def inspect(self, spec: StageSpec, fp: Optional[str], digests: dict[str, Optional[str]],
                full_verify: bool = False, altered: Optional[str] = None) -> tuple[str, str]:
        """(status, reason) of a stage on disk against fingerprint `fp` (None: inputs not all published).

        `altered`: a problem with the stage's output found by hashing it before a downstream
        stage reads it.
        """
        sdir = self.stage_dir(spec.name)
        manifest = self.manifest(spec.name)
        state = rundir.read_json(sdir / rundir.STATE) or {}
        if manifest is not None:
            if fp is not None and manifest.get("fingerprint") == fp:
                if altered:
                    return "corrupt", altered
                problems = rundir.verify_files(sdir / rundir.OUTPUT, manifest.get("files", {}), full=full_verify)
                if problems:
                    return "corrupt", f"output altered: {self._rel(problems[0])}"
                cached = manifest.get("cache") or {}
                return "done", f"up to date (from cache {short_key(cached['key'])})" if cached.get("key") else "up to date"
            return "stale", self._why_stale(spec, manifest, digests)
        if fp is not None and state.get("status") == "failed" and state.get("fingerprint") == fp:
            return "failed", f"failed: {state.get('error', '?')}"
        interrupted = fp is not None and state.get("status") == "interrupted" and state.get("fingerprint") == fp
        if fp is not None and state.get("status") == "running" and state.get("fingerprint") == fp \
                and state.get("host") == socket.gethostname() and rundir._alive(int(state.get("pid", -1)), None):
            return "running", f"running in pid {state['pid']} since {state.get('started')}"
        ckpt = sdir / rundir.CHECKPOINTS
        if fp is not None and _checkpoint_fingerprint(ckpt) == fp:
            resume = _resume_description(ckpt, full_verify)
            return "partial", _what_stopped(state) + resume.removeprefix("interrupted") if interrupted else resume
        if interrupted:
            return "missing", f"{_what_stopped(state)} before it finished; runs again"
        return "missing", self._unbuilt_reason(sdir)

    def _rel(self, problem: str) -> str:
        """A verification problem with its path shown relative to the run directory."""
        prefix = str(self.run_dir) + os.sep
        return problem.replace(prefix, "", 1) if problem.startswith(prefix) else problem

    def _why_stale(self, spec: StageSpec, manifest: dict, digests: dict[str, Optional[str]]) -> str:
        parts = []
        changed = _changed_keys(manifest.get("config", {}), spec.config)
        if changed:
            parts.append(f"settings changed: {', '.join(changed[:6])}")
        if "code" in manifest:
            files = changed_files(manifest["code"], self.code(spec))
            if files:
                parts.append(f"code changed: {', '.join(files[:4])}" + (f" (+{len(files) - 4} more)" if len(files) > 4 else ""))
        parts += _input_changes(spec, manifest, digests)
        missing = [d for d in spec.deps if digests.get(d) is None]
        if missing:
            parts.append(f"input not built yet: {', '.join(missing)}")
        if parts:
            return "; ".join(parts)
        if "code" in manifest and "inputs" in manifest:
            # Settings, code and inputs as recorded all match: only the fingerprint differs.
            return ("its manifest's fingerprint does not match the settings, code and inputs it records "
                    "(the manifest was edited, or made by an earlier version of the pipeline)")
        return "made by an earlier version of the pipeline"

    def plan(self, from_stage: Optional[str] = None, only: Optional[str] = None, force: bool = False,
             full_verify: bool = False) -> list[PlannedStage]:
        """What `run` would do, and why, without writing anything.

        When `verify_inputs` is on, every upstream output that a running stage will read is
        hashed against its manifest; an altered one makes its own stage run first.
        """
        problem = selection_problem(list(self.by_name), from_stage, only)
        if problem:
            raise InputError(problem)
        check_records(self.run_dir)  # a damaged record is refused, never guessed at
        for spec in self.specs:  # the code as it is now, before any stage runs (`code`)
            self.code(spec)
        forced: set[str] = set()
        if from_stage:
            forced = downstream_of(self.specs, from_stage)
        if force:
            forced = {only} if only else set(self.by_name)

        altered: dict[str, str] = {}
        memo: dict = {}
        while True:
            planned = self._plan_once(forced, only, full_verify, altered)
            found = self._hash_inputs(planned, altered, memo) if self.verify_inputs else {}
            if not found:
                break
            altered.update(found)

        if only:
            target = next(p for p in planned if p.spec.name == only)
            not_done = [p for p in planned if p.spec.name in target.spec.deps and p.status != "done"]
            corrupt = [p for p in not_done if p.status == "corrupt"]
            if corrupt:
                # Nothing has run: a damaged run directory, bad input like a missing upstream (exit 2).
                raise InputError(f"--only {only}: its input {corrupt[0].spec.name} does not match its manifest "
                                 f"({corrupt[0].reason}); rebuild it first (drop --only, or use --from {corrupt[0].spec.name})")
            if not_done:
                raise InputError(
                    f"--only {only}: its upstream stage(s) {', '.join(p.spec.name for p in not_done)} are not done; "
                    f"run them first (drop --only, or use --from {not_done[0].spec.name})"
                )
        return planned

    def _plan_once(self, forced: set[str], only: Optional[str], full_verify: bool,
                   altered: dict[str, str]) -> list[PlannedStage]:
        planned: list[PlannedStage] = []
        will_run: set[str] = set()  # their output is known only once they have run
        restored: dict[str, str] = {}  # stage -> the output digest its cache entry will give it
        for spec in self.specs:
            fp, digests = self.current_fingerprint(spec, restored)
            status, reason = self.inspect(spec, fp, digests, full_verify, altered.get(spec.name))
            unknown = tuple(d for d in spec.deps if d in will_run)
            waits = tuple(d for d in spec.deps if d in will_run or d in restored)
            if only and spec.name != only:
                action, reason, waits = "skip", f"{status}: {reason} (not selected by --only)", ()
            elif spec.name in forced:
                action, reason = "run", "forced"
            elif unknown and status == "done":
                them = ", ".join(unknown)
                action, reason = "run", f"after {them}: re-runs unless the output of {them} comes out unchanged"
            elif status == "done":
                action = "skip"
            else:
                action = "run"
            basis = ""
            entry = self._cached(spec, fp) if action == "run" and spec.name not in forced and not unknown else None
            if entry is not None:
                action, basis, reason = "cache", reason, _from_cache(entry.key, reason)
                restored[spec.name] = entry.digest
            if action == "run":
                will_run.add(spec.name)
            planned.append(PlannedStage(spec, None if unknown else fp, action, reason, status, waits,
                                        forced=spec.name in forced, basis=basis))
        return planned

    def _cache_for(self, spec: StageSpec) -> Optional[StageCache]:
        """The stage cache, for a stage whose output it may hold."""
        return self.cache if spec.cacheable else None

    def _cached(self, spec: StageSpec, fp: Optional[str]) -> Optional[Entry]:
        """The cache entry `plan` expects to restore for fingerprint `fp` (sizes checked; `run`
        verifies it again, with hashes when `verify_inputs`, before using it)."""
        cache = self._cache_for(spec)
        if cache is None or fp is None:
            return None
        return cache.find(fp, full=False, discard=False)

    def _hash_inputs(self, planned: list[PlannedStage], altered: dict[str, str], memo: dict) -> dict[str, str]:
        """Hash the outputs of skipped stages that a running stage reads; {stage: problem} for altered ones.

        A stage planned from the cache counts as running: its entry can still fail verification
        when it is due, and then the stage runs on these inputs.
        """
        by_name = {p.spec.name: p for p in planned}
        found: dict[str, str] = {}
        for p in planned:
            if p.action not in ("run", "cache"):
                continue
            for dep in p.spec.deps:
                d = by_name[dep]
                if d.action != "skip" or d.status != "done" or dep in altered or dep in found:
                    continue
                manifest = self.manifest(dep) or {"files": {}}  # done: its manifest was well-formed
                problems = rundir.verify_files(self.stage_dir(dep) / rundir.OUTPUT, manifest["files"],
                                               full=True, memo=memo)
                if problems:
                    found[dep] = f"output altered: {self._rel(problems[0])} (found before {p.spec.name} read it)"
        return found

    def decide(self, p: PlannedStage, rebuilt: Optional[set[str]] = None) -> tuple[Optional[str], str, str]:
        """(fingerprint, action, reason) of a planned stage at the moment it is due; action
        "skip" or "run" (which the stage cache may still serve: `_restore`).

        A stage that waited on upstream stages (run or restored from the cache) is decided
        again from their published outputs: unchanged bytes upstream leave it up to date. Its
        own output is then hashed against its manifest (with `verify_inputs`), as planning
        hashes the output of every skipped stage a running one reads: planning could not
        (the stage was due to run), and a later stage may read it.
        """
        if not p.waits_on:
            return p.fingerprint, "skip" if p.action == "skip" else "run", p.basis or p.reason
        fp, digests = self.current_fingerprint(p.spec)
        if p.forced:
            return fp, "run", p.reason
        status, reason = self.inspect(p.spec, fp, digests, full_verify=self.verify_inputs)
        if status == "done":
            # Name what did rebuild: a stage it waited on may itself have turned out up to date.
            remade = [d for d in p.waits_on if rebuilt is None or d in rebuilt]
            return fp, "skip", reason if p.action == "skip" else \
                f"up to date ({', '.join(remade)} rebuilt with identical output)" if remade else \
                "up to date (the stages before it came out unchanged)"
        return fp, "run", reason

    # ------------------------------------------------------------------------------ running

    def run(self, from_stage: Optional[str] = None, only: Optional[str] = None, force: bool = False) -> list[PlannedStage]:
        ranks = Ranks()
        planned = self.plan(from_stage, only, force)
        ranks.barrier()  # every rank has planned from the same state before anything is written
        if not ranks.is_main:
            self._follow(planned, ranks)
            return planned
        created_folders = rundir.create_run_dir(self.run_dir)  # empty: the run directory existed
        run_json_path = self.run_dir / "run.json"
        previous_run_json = run_json_path.read_bytes() if run_json_path.is_file() else None
        created_runs: list[Optional[str]] = []
        try:
            with rundir.RunLock(self.run_dir / ".lock"):
                _remove_leftover_atomic_writes(self.run_dir)
                run_json = rundir.read_json(run_json_path) or {}
                parent_id = None
                if self.tracker:
                    parent_id = self.tracker.parent_run(
                        run_json.get("mlflow_parent_run_id"), self.run_dir.name, self.params,
                        tags={"run_dir": str(self.run_dir.resolve()), "code_version": code_version()},
                    )
                    if parent_id != run_json.get("mlflow_parent_run_id"):
                        created_runs.append(parent_id)
                run_json.update({
                    "recipe": self.recipe_dump,
                    "mlflow_parent_run_id": parent_id or run_json.get("mlflow_parent_run_id"),
                    "tracking_uri": self.tracker.uri if self.tracker else None,
                    "code_version": code_version(),
                    "stages": [s.name for s in self.specs],
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                })
                try:
                    rundir.write_json_atomic(run_json_path, run_json)
                except OSError as exc:
                    raise rundir.write_refused(run_json_path, exc) from None
                try:
                    for p in planned:
                        if p.settled:
                            logger.info("%-22s skip  (%s)", p.spec.name, p.reason)
                            p.outcome = "skipped"
                            if p.status == "done":
                                self._offer_to_cache(p.spec)
                            continue
                        rebuilt = {q.spec.name for q in planned if q.outcome in ("ran", "resumed", "cached")}
                        fp, action, reason = self.decide(p, rebuilt)
                        ranks.agree(action)  # the other ranks wait for this decision, not their own
                        if action == "skip":
                            logger.info("%-22s skip  (%s)", p.spec.name, reason)
                            p.action, p.reason, p.outcome = "skip", reason, "skipped"
                            self._offer_to_cache(p.spec)
                            continue
                        p.fingerprint, p.reason = fp, reason
                        if p.forced or not self._restore(p, parent_id, ranks, created_runs):
                            p.action = "run"
                            self._run_stage(p, parent_id, ranks, created_runs)
                        ranks.barrier()
                except BaseException:
                    if self.tracker:
                        self.tracker.finish(parent_id, "FAILED")
                    raise
                if self.tracker:
                    self.tracker.finish(parent_id, "FINISHED")
        except InputError:
            # Bad input found while running: leave the run directory as it was before. (The
            # refused stage has already put its own folder back and deleted its new MLflow run.)
            # Stages that finished before the refusal are kept, in a run directory this command
            # made too: removing it would throw away their work (training, say) for a problem
            # found later, which a rerun after the fix resumes from.
            finished = [p.spec.name for p in planned if p.outcome in ("ran", "resumed", "cached")]
            if finished:
                logger.warning("kept in %s: %d stage(s) finished before the refusal (%s); fix the problem and "
                               "rerun to go on from them", self.run_dir, len(finished), ", ".join(finished))
            elif created_folders:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                rundir.remove_empty_folders(created_folders[:-1])  # the parents made for it, e.g. runs/
                for run_id in created_runs if self.tracker else ():
                    self.tracker.delete(run_id)
                if self.tracker:
                    self.tracker.discard_new_store()  # a store made for this run only: it goes too
            else:
                # Nothing of this command is kept: its MLflow runs (a new parent) and run.json go
                # back too.
                for run_id in created_runs if self.tracker else ():
                    self.tracker.delete(run_id)
                try:
                    if previous_run_json is not None:
                        rundir.write_bytes_atomic(run_json_path, previous_run_json)
                    else:
                        run_json_path.unlink(missing_ok=True)
                except OSError:
                    pass  # a full disk: the failed write kept a whole run.json, this run's or the old
            raise
        return planned

    def _follow(self, planned: list[PlannedStage], ranks: Ranks) -> None:
        """A non-main rank: wait while the main process runs each stage; join distributed ones
        (unless the main process restored it from the stage cache instead of running it).

        Settled stages are the same on every rank (each planned from the same files, before
        anything was written); every other decision is the main process's (`Ranks.agree`).
        """
        for p in planned:
            if p.settled:
                continue
            if ranks.agree() == "skip":
                continue
            how = ranks.agree()  # "running" once its directories are ready, or "restored"
            if p.spec.distributed and how == "running":
                sdir = self.stage_dir(p.spec.name)
                scratch = sdir / f"output.rank{ranks.rank}"
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(parents=True)
                ctx = StageContext(
                    name=p.spec.name, config=p.spec.config,
                    inputs={d: self.stage_dir(d) / rundir.OUTPUT for d in p.spec.deps}, output_dir=scratch,
                    checkpoint_dir=sdir / rundir.CHECKPOINTS, metrics=_NullLogger(), progress=_progress,
                    run_dir=self.run_dir, runtime=p.spec.runtime,
                )
                try:
                    p.spec.fn(ctx)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            ranks.barrier()  # the main process has published the stage

    def _run_stage(self, p: PlannedStage, parent_id: Optional[str], ranks: Optional[Ranks] = None,
                   created_runs: Optional[list] = None) -> StageResult:
        spec, fp = p.spec, p.fingerprint
        sdir = self.stage_dir(spec.name)
        stage_existed = sdir.exists()
        previous_state = (sdir / rundir.STATE).read_bytes() if (sdir / rundir.STATE).is_file() else None
        ckpt = sdir / rundir.CHECKPOINTS
        fp_file = ckpt / CKPT_FINGERPRINT
        partial = sdir / rundir.PARTIAL
        child_id = None
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            sdir.mkdir(parents=True, exist_ok=True)
            if (ckpt.exists() or ckpt.is_symlink()) and not ckpt.is_dir():
                rundir.remove_path(ckpt)  # a file where the checkpoints go: nothing to resume
            ours = ckpt.exists() and _checkpoint_fingerprint(ckpt) == fp
            resumed = ours and not p.forced and any(c.name != CKPT_FINGERPRINT for c in ckpt.iterdir())
            if ckpt.exists() and not ours:
                shutil.rmtree(ckpt)  # progress of a different configuration: not ours to resume
            elif ckpt.exists() and p.forced:
                # --force / --from start the stage over: its own checkpoints (training steps,
                # quantized layers, AWQ searches) may be what the user distrusts.
                logger.info("%-22s forced: its checkpoints are discarded, it starts over", spec.name)
                shutil.rmtree(ckpt)
            ckpt_existed = ckpt.exists()
            ckpt.mkdir(exist_ok=True)
            rundir.write_bytes_atomic(fp_file, fp.encode())
            rundir.remove_path(partial)
            partial.mkdir()
            child_id = self._child_run(spec, fp, parent_id, created_runs)
            rundir.write_json_atomic(sdir / rundir.STATE, {
                "fingerprint": fp, "status": "running", "started": started, "pid": os.getpid(),
                "host": socket.gethostname(), "mlflow_run_id": child_id,
            })
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM while it was set up (an MLflow call may wait)
            shutil.rmtree(partial, ignore_errors=True)
            _remove_temporaries(sdir)
            if self.tracker:
                self.tracker.finish(child_id, "KILLED")
            if (sdir / rundir.STATE).exists():
                _record_stopped(sdir, fp, "interrupted", started, f"{interruption(exc)}; rerun the same command to resume",
                                child_id)
            raise
        except OSError as exc:
            # The stage could not even be set up (a full disk, a folder turned read-only): its
            # checkpoints stay; a stage folder this attempt made goes, the rest is as it was.
            shutil.rmtree(partial, ignore_errors=True)
            _remove_temporaries(sdir)
            if not stage_existed:
                shutil.rmtree(sdir, ignore_errors=True)
            if self.tracker:
                self.tracker.finish(child_id, "FAILED")
            where = getattr(exc, "filename", None) or sdir
            if rundir.is_disk_full(exc):
                raise StageError(f"stage {spec.name}: no space left on device while writing {where}; free some space "
                                 "and rerun the same command to resume") from exc
            raise StageError(f"stage {spec.name}: cannot write {where} ({exc.strerror or exc}); "
                             f"{rundir.RUN_DIR_HINT}") from exc
        # From the moment the state says "running" every line is inside this `try`: a Ctrl-C or
        # SIGTERM landing between the set-up and the stage's own code once left it "running".
        try:
            if ranks is not None:
                ranks.agree("running")  # directories ready: distributed stages start on every rank
            inputs = {d: self.stage_dir(d) / rundir.OUTPUT for d in spec.deps}
            metric_logger = self.tracker.logger_for(child_id) if self.tracker else _NullLogger()
            ctx = StageContext(
                name=spec.name, config=spec.config, inputs=inputs, output_dir=partial,
                checkpoint_dir=ckpt, metrics=metric_logger, progress=_progress, run_dir=self.run_dir,
                runtime=spec.runtime,
            )
            logger.info("%-22s run   (%s)", spec.name, p.reason)
            t0 = time.time()
            result = spec.fn(ctx) or StageResult()
            seconds = time.time() - t0
            self._publish(spec, fp, result, seconds, started, child_id, parent_id)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            _remove_temporaries(sdir)
            if isinstance(exc, InputError):
                # Bad input, not a failed stage: put the stage's directory back as it was.
                if not stage_existed:
                    shutil.rmtree(sdir, ignore_errors=True)
                else:
                    if not ckpt_existed:
                        shutil.rmtree(ckpt, ignore_errors=True)
                    if previous_state is None:
                        (sdir / rundir.STATE).unlink(missing_ok=True)
                    else:
                        rundir.write_bytes_atomic(sdir / rundir.STATE, previous_state)
                if self.tracker and created_runs is not None and child_id in created_runs:
                    created_runs.remove(child_id)
                    self.tracker.delete(child_id)  # made for this attempt, which left nothing
                elif self.tracker:
                    self.tracker.finish(child_id, "FAILED")
                raise
            full = _disk_full(exc)
            err = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if isinstance(exc, KeyboardInterrupt):  # not "KeyboardInterrupt: " in `status`
                err = f"{interruption(exc)}; rerun the same command to resume"
                if _published_since(sdir, started):
                    raise  # it came after the stage was published (while storing it in the cache): done stays done
            if full is not None:
                where = getattr(full, "filename", None) or partial
                err = f"no space left on device while writing {where}"
            _record_stopped(sdir, fp, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", started, err,
                            child_id)
            if self.tracker:
                self.tracker.finish(child_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            if isinstance(exc, KeyboardInterrupt):
                raise
            if full is not None:
                raise StageError(f"stage {spec.name}: {err}; free some space and rerun the same command to resume") from exc
            raise StageError(f"stage {spec.name} failed: {err}") from exc
        p.seconds = seconds
        p.peak_rss_bytes = process_peak_rss()
        p.outcome = "resumed" if resumed else "ran"
        logger.info("%-22s done  in %.1fs", spec.name, seconds)
        return result

    def _child_run(self, spec: StageSpec, fp: str, parent_id: Optional[str],
                   created_runs: Optional[list]) -> Optional[str]:
        """The stage's MLflow run: the one of its last attempt at this fingerprint, else a new one."""
        if not self.tracker:
            return None
        state = rundir.read_json(self.stage_dir(spec.name) / rundir.STATE) or {}
        previous = state.get("mlflow_run_id") if state.get("fingerprint") == fp else None
        child_id = self.tracker.child_run(parent_id, previous, spec.name)
        if child_id != previous and created_runs is not None:
            created_runs.append(child_id)
        return child_id

    def _publish(self, spec: StageSpec, fp: str, result: StageResult, seconds: float, started: str,
                 child_id: Optional[str], parent_id: Optional[str]) -> None:
        metrics = {**result.metrics, "stage_seconds": round(seconds, 3)}
        edited = self.code_changed_while_running(spec)
        if edited:
            # Published (downstream stages read it by content), but recorded under a fingerprint
            # no code has, so the next run runs it again, and never offered to the stage cache.
            files = [k for k, v in edited.items() if v == CHANGED_WHILE_RUNNING]
            logger.warning("%s: its code changed while it ran (%s); it runs again next time", spec.name,
                           ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else ""))
            fp = fingerprint(spec, edited, self.input_digests(spec))
        out, manifest = self._record(spec, fp, started, child_id, metrics, result.info, code=edited or None)
        self._track(child_id, parent_id, metrics, result.parent_metrics,
                    {"output_dir": str(out.resolve()), "fingerprint": fp})
        cache = self._cache_for(spec)
        if cache is not None and not edited:  # only the main process publishes: other ranks never store
            cache.store(fp, out, {
                "stage": spec.name, "files": manifest["files"], "metrics": metrics, "info": result.info,
                "parent_metrics": result.parent_metrics, "source": str(self.stage_dir(spec.name).resolve()),
            })

    def _record(self, spec: StageSpec, fp: str, started: str, child_id: Optional[str], metrics: dict, info: dict,
                files: Optional[dict] = None, extra: Optional[dict] = None,
                code: Optional[dict] = None) -> tuple[Path, dict]:
        """Swap `output.partial/` into place and write the stage's manifest (its file table:
        `files`, else hashed now) and its state (done). Returns (output dir, manifest)."""
        sdir = self.stage_dir(spec.name)
        self._warn_about_added_files(spec.name)
        # Drop the old manifest first so no manifest ever points at a half-swapped output.
        (sdir / rundir.MANIFEST).unlink(missing_ok=True)
        rundir.fsync_dir(sdir)
        out = rundir.publish_output(sdir)
        manifest = {
            "stage": spec.name,
            "fingerprint": fp,
            "config": spec.config,
            "code": self.code(spec) if code is None else code,
            "inputs": {d: v for d, v in self.input_digests(spec).items()},
            "files": rundir.describe_files(out) if files is None else files,
            "metrics": metrics,
            "info": info,
            "mlflow_run_id": child_id,
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        rundir.write_json_atomic(sdir / rundir.MANIFEST, manifest)
        rundir.write_json_atomic(sdir / rundir.STATE, {
            "fingerprint": fp, "status": "done", "started": started, "mlflow_run_id": child_id,
        })
        shutil.rmtree(sdir / rundir.CHECKPOINTS, ignore_errors=True)
        return out, manifest

    def _warn_about_added_files(self, name: str) -> None:
        """Name the files someone put in stage `name`'s output folder, which publishing its new
        output is about to delete: they were never the stage's (not in its manifest), but they
        may be the user's only copy."""
        manifest = self.manifest(name)
        out = self.stage_dir(name) / rundir.OUTPUT
        if manifest is None or not out.is_dir():
            return
        added = [path for path in sorted(out.rglob("*"))
                 if path.is_file() and path.relative_to(out).as_posix() not in manifest["files"]]
        if added:
            shown = ", ".join(self._rel(str(path)) for path in added[:6]) + (
                f" (+{len(added) - 6} more)" if len(added) > 6 else "")
            logger.warning("%s: removing %d file(s) not made by the stage from its output folder: %s", name,
                           len(added), shown)

    def _track(self, child_id: Optional[str], parent_id: Optional[str], metrics: dict, parent_metrics: dict,
               tags: dict[str, str]) -> None:
        """Log a finished stage's metrics (and the parent run's share) and close its MLflow run."""
        if not self.tracker:
            return
        self.tracker.log_metrics(child_id, metrics)
        if parent_metrics:
            self.tracker.log_metrics(parent_id, parent_metrics)
        self.tracker.set_tags(child_id, tags)
        self.tracker.finish(child_id, "FINISHED")

    # ------------------------------------------------------------------------------ the stage cache

    def _offer_to_cache(self, spec: StageSpec) -> None:
        """Store an up-to-date stage that the cache lacks: a run killed between publishing a
        stage and storing it (or a cache emptied since) would otherwise never offer it again.
        The entry records the manifest's hashes, so bytes altered since are found when a run
        directory restores it (`StageCache.find` verifies)."""
        cache = self._cache_for(spec)
        manifest = rundir.read_json(self.stage_dir(spec.name) / rundir.MANIFEST) if cache is not None else None
        if manifest is None or not manifest.get("fingerprint") or not rundir.good_file_table(manifest.get("files")):
            return
        if cache.find(manifest["fingerprint"], full=False, discard=False) is not None:
            return
        # No parent metrics: only the report has any, and it is never cached (`StageSpec.cacheable`).
        cache.store(manifest["fingerprint"], self.stage_dir(spec.name) / rundir.OUTPUT, {
            "stage": spec.name, "files": manifest["files"], "metrics": manifest.get("metrics", {}),
            "info": manifest.get("info", {}), "source": str(self.stage_dir(spec.name).resolve()),
        })

    def _restore(self, p: PlannedStage, parent_id: Optional[str], ranks: Optional[Ranks] = None,
                 created_runs: Optional[list] = None) -> bool:
        """Serve a due stage from the stage cache instead of running it: the entry's files
        become its output and its manifest is written as if it had run (the same file table,
        the original metrics, `stage_seconds` included, and a `cache` record).

        False when the cache has no good entry for its fingerprint, or the entry cannot be
        put in place (then the stage runs, which handles a full disk its own way).
        """
        cache = self._cache_for(p.spec)
        if cache is None or p.fingerprint is None:
            return False
        t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry = cache.find(p.fingerprint, full=self.verify_inputs, discard=True)
        if entry is None:
            return False
        spec = p.spec
        sdir = self.stage_dir(spec.name)
        partial = sdir / rundir.PARTIAL
        child_id = None
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            place_files(entry.output, partial, entry.files)
            child_id = self._child_run(spec, p.fingerprint, parent_id, created_runs)
            seconds = time.time() - t0
            record = {"cache": {"key": entry.key, "entry": str(entry.path), "source": entry.record.get("source"),
                                "restore_seconds": round(seconds, 3)}}  # verified and put in place
            out, _ = self._record(spec, p.fingerprint, started, child_id, entry.record.get("metrics", {}),
                                  entry.record.get("info", {}), files=with_mtimes(partial, entry.files), extra=record)
        except BaseException as exc:  # OSError: the stage runs instead; Ctrl-C, SIGTERM: stop, tidy
            if not _published_since(sdir, started, p.fingerprint):
                shutil.rmtree(partial, ignore_errors=True)
                _remove_temporaries(sdir)
            if self.tracker and child_id:
                self.tracker.finish(child_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            if not isinstance(exc, OSError):
                raise
            logger.warning("%-22s could not restore cache entry %s (%s); the stage runs", spec.name,
                           short_key(entry.key), exc)
            return False
        p.reason = _from_cache(entry.key, p.reason)
        logger.info("%-22s cache (%s)", spec.name, p.reason)
        self._track(child_id, parent_id, entry.record.get("metrics", {}), entry.record.get("parent_metrics", {}),
                    {"output_dir": str(out.resolve()), "fingerprint": p.fingerprint, "from_cache": entry.key})
        p.action, p.outcome, p.seconds = "cache", "cached", time.time() - t0
        logger.info("%-22s done  in %.1fs (from the stage cache)", spec.name, p.seconds)
        if ranks is not None:
            ranks.agree("restored")  # the other ranks do not join: nothing runs
        return True


def _input_changes(spec: StageSpec, manifest: dict, digests: dict[str, Optional[str]]) -> list[str]:
    """How the stage's inputs differ from those its manifest records: changed content, and
    upstream stages that became or stopped being inputs (a quantize entry removed, say)."""
    if "inputs" not in manifest:  # an older manifest: only content changes can be told
        moved = [d for d in spec.deps if digests.get(d) is not None]
        return [f"input changed: {', '.join(moved)}"] if moved else []
    recorded = manifest["inputs"]
    parts = []
    moved = [d for d in spec.deps if d in recorded and digests.get(d) is not None and recorded[d] != digests[d]]
    if moved:
        parts.append(f"input changed: {', '.join(moved)}")
    added = [f"{d} now an input" for d in spec.deps if d not in recorded]
    dropped = [f"{d} no longer an input" for d in sorted(recorded) if d not in spec.deps]
    if added or dropped:
        parts.append(f"inputs changed: {', '.join(added + dropped)}")
    return parts


def _record_stopped(sdir: Path, fp: str, status: str, started, error: str, child_id: Optional[str]) -> None:
    """The state of a stage that stopped ("failed" or "interrupted") with why; on a disk too full
    to write it the old state stays (and the temporary file goes), so the next run finds it."""
    try:
        rundir.write_json_atomic(sdir / rundir.STATE, {"fingerprint": fp, "status": status, "started": started,
                                                       "error": error, "mlflow_run_id": child_id})
    except OSError:
        _remove_temporaries(sdir)


def _what_stopped(state: dict) -> str:
    """"interrupted (Ctrl-C)" or "terminated (SIGTERM)", from an interrupted stage's state."""
    error = state.get("error")
    return error.split(";")[0] if isinstance(error, str) and error else "interrupted"


def _published_since(sdir: Path, started: str, fp: Optional[str] = None) -> bool:
    """Whether the attempt at a stage that began at `started` (with fingerprint `fp`, when
    given) has published it: state done, with a manifest of the same fingerprint."""
    state = rundir.read_json(sdir / rundir.STATE) or {}
    manifest = rundir.read_json(sdir / rundir.MANIFEST) or {}
    return (state.get("status") == "done" and state.get("started") == started
            and manifest.get("fingerprint") == state.get("fingerprint") and fp in (None, state.get("fingerprint")))


def _resume_description(ckpt: Path, full: bool) -> str:
    """What an interrupted stage resumes from. Checkpoints sealed with a record of their files
    (`rundir.seal_checkpoint`) are checked against it, sizes only unless `full`, so a damaged
    one is not promised; other progress files are counted."""
    entries = [c for c in ckpt.iterdir() if c.name != CKPT_FINGERPRINT]
    if not entries:
        return "interrupted before its first checkpoint; restarts"
    sealed = sorted(c for c in entries if rundir.is_sealed(c))
    if not sealed:
        return f"interrupted; resumes from {len(entries)} checkpoint file(s)"
    damaged = {c.name: problems[0] for c in sealed if (problems := rundir.checkpoint_problems(c, full=full))}
    intact = [c.name for c in sealed if c.name not in damaged]
    if not intact:
        first = next(iter(damaged.values())).replace(str(ckpt.parent.parent) + os.sep, "", 1)
        return f"interrupted; no intact checkpoint ({len(damaged)} damaged, e.g. {first}); restarts"
    skipped = [name for name in damaged if name > intact[-1]]
    return f"interrupted; resumes from checkpoint {intact[-1]}" + (
        f" ({', '.join(skipped)} damaged: skipped)" if skipped else "")


def _checkpoint_fingerprint(ckpt: Path) -> Optional[str]:
    """The fingerprint a stage's checkpoints were made at (None: none, or unreadable)."""
    try:
        return (ckpt / CKPT_FINGERPRINT).read_bytes().decode("utf-8", errors="replace").strip()
    except OSError:
        return None


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
