"""The stage runner on small pure-Python stages: skip, re-run what changed, resume, corruption, lock."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest

from qlora_pipeline.errors import InputError, RunLockedError, StageError, Terminated
from qlora_pipeline.graph import StageResult, StageSpec
from qlora_pipeline.rundir import RunLock, describe_lock, lock_is_stale
from qlora_pipeline.runner import Runner


class Toy:
    """Three stages a -> b -> c; b counts in checkpoints and can be told to crash midway."""

    def __init__(self, tmp_path):
        self.run_dir = tmp_path / "run"
        self.calls: list[str] = []
        self.crash_b_at: int | None = None
        self.crash_with: type[BaseException] = RuntimeError
        self.b_steps_done: list[int] = []

    def a(self, ctx):
        self.calls.append("a")
        (ctx.output_dir / "a.txt").write_text(f"a={ctx.config['value']}")
        return StageResult(metrics={"value": ctx.config["value"]})

    def b(self, ctx):
        self.calls.append("b")
        upstream = (ctx.inputs["a"] / "a.txt").read_text()
        for step in range(5):
            mark = ctx.checkpoint_dir / f"step-{step}"
            if mark.exists():
                continue
            if self.crash_b_at == step:
                raise self.crash_with("simulated crash")
            self.b_steps_done.append(step)
            mark.write_text(str(step))
        (ctx.output_dir / "b.txt").write_text(upstream + f" b={ctx.config['value']}")
        return StageResult()

    def c(self, ctx):
        self.calls.append("c")
        (ctx.output_dir / "c.txt").write_text((ctx.inputs["b"] / "b.txt").read_text() + " c")
        return StageResult()

    def runner(self, a=1, b=1, c=1) -> Runner:
        specs = [
            StageSpec("a", self.a, (), {"value": a}),
            StageSpec("b", self.b, ("a",), {"value": b}),
            StageSpec("c", self.c, ("b",), {"value": c}),
        ]
        return Runner(self.run_dir, specs)


def bit_rot(path) -> None:
    """Alter a file's bytes keeping its size and mtime: only hashing can tell."""
    st = path.stat()
    path.write_text("X" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def toy(tmp_path):
    return Toy(tmp_path)


def test_runs_then_skips_everything(toy):
    toy.runner().run()
    assert toy.calls == ["a", "b", "c"]
    assert (toy.run_dir / "c" / "output" / "c.txt").read_text() == "a=1 b=1 c"
    manifest = json.loads((toy.run_dir / "a" / "manifest.json").read_text())
    assert manifest["files"]["a.txt"]["size"] == 3 and len(manifest["files"]["a.txt"]["sha256"]) == 64
    assert manifest["metrics"]["value"] == 1
    toy.calls.clear()
    planned = toy.runner().run()
    assert toy.calls == [] and all(p.action == "skip" for p in planned)


def test_changing_a_setting_reruns_that_stage_and_downstream_only(toy):
    toy.runner().run()
    toy.calls.clear()
    plan = toy.runner(b=2).plan()
    assert [(p.spec.name, p.action) for p in plan] == [("a", "skip"), ("b", "run"), ("c", "run")]
    assert "settings changed: value" in plan[1].reason
    toy.runner(b=2).run()
    assert toy.calls == ["b", "c"]
    toy.calls.clear()
    toy.runner(b=2, c=5).run()
    assert toy.calls == ["c"]


def test_from_only_force(toy):
    toy.runner().run()
    toy.calls.clear()
    toy.runner().run(from_stage="b")
    assert toy.calls == ["b", "c"]
    toy.calls.clear()
    toy.runner().run(only="b")
    assert toy.calls == []  # up to date: --only runs just that stage when it needs to
    toy.runner().run(only="b", force=True)
    assert toy.calls == ["b"]
    toy.calls.clear()
    toy.runner().run(force=True)
    assert toy.calls == ["a", "b", "c"]
    with pytest.raises(InputError, match="unknown stage 'z'"):
        toy.runner().plan(only="z")


@pytest.mark.parametrize("selection", [{"force": True}, {"only": "b", "force": True}, {"from_stage": "b"}])
def test_force_starts_an_interrupted_stage_over_instead_of_resuming(toy, selection):
    """--force (and --from) re-run a stage from scratch: its checkpoints may be what is wrong
    (a damaged training checkpoint made every forced run resume and fail the same way)."""
    toy.crash_b_at = 3
    with pytest.raises(StageError, match="simulated crash"):
        toy.runner().run()
    toy.crash_b_at = None
    toy.b_steps_done.clear()
    planned = toy.runner().run(**selection)
    assert toy.b_steps_done == [0, 1, 2, 3, 4]
    assert planned[1].outcome == "ran"


def test_only_refuses_when_upstream_is_not_done(tmp_path):
    toy = Toy(tmp_path)
    with pytest.raises(InputError, match="upstream stage"):
        toy.runner().run(only="c")


def test_crash_resumes_from_intra_stage_checkpoint(toy):
    toy.crash_b_at = 3
    with pytest.raises(StageError, match="simulated crash"):
        toy.runner().run()
    assert not (toy.run_dir / "b" / "manifest.json").exists()
    assert not (toy.run_dir / "b" / "output").exists()
    plan = toy.runner().plan()
    assert plan[1].status == "failed" and "simulated crash" in plan[1].reason
    toy.crash_b_at = None
    toy.runner().run()
    assert toy.b_steps_done == [0, 1, 2, 3, 4]  # steps 0-2 were not redone
    assert not (toy.run_dir / "b" / "checkpoints").exists()


@pytest.mark.parametrize("signal, said", [(KeyboardInterrupt, "interrupted (Ctrl-C)"),
                                          (Terminated, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_in_a_stage_is_recorded_as_an_interruption_and_resumes(toy, signal, said):
    """`status` said "failed" after a Ctrl-C, "partial" after kill -9, for the same resumable
    state (found by QA); `cli run` turns SIGTERM into `Terminated`."""
    toy.crash_b_at, toy.crash_with = 2, signal
    with pytest.raises(signal):
        toy.runner().run()
    assert json.loads((toy.run_dir / "b" / "state.json").read_text())["status"] == "interrupted"
    plan = toy.runner().plan()
    assert plan[1].status == "partial"
    assert plan[1].reason == f"{said}; resumes from 2 checkpoint file(s)"  # not "KeyboardInterrupt: "
    toy.crash_b_at = None
    toy.runner().run()
    assert toy.b_steps_done == [0, 1, 2, 3, 4]  # steps 0-1 were not redone


def test_ctrl_c_between_setting_up_a_stage_and_its_code_is_recorded_as_an_interruption(toy, monkeypatch):
    """A signal landing after the state said "running" but before the stage's code began (the
    "run" log line, the stage's context) left the state "running" after a clean exit 130 (a CI run
    of the SIGINT integrity test, where the signal follows the first file in checkpoints/)."""
    from qlora_pipeline import runner as runner_module

    real_context = runner_module.StageContext

    def context_interrupted_for_b(**fields):
        if fields["name"] == "b":
            raise KeyboardInterrupt
        return real_context(**fields)

    monkeypatch.setattr(runner_module, "StageContext", context_interrupted_for_b)
    with pytest.raises(KeyboardInterrupt):
        toy.runner().run()
    state = json.loads((toy.run_dir / "b" / "state.json").read_text())
    assert state["status"] == "interrupted", state
    assert not (toy.run_dir / "b" / "output.partial").exists()
    monkeypatch.undo()
    toy.runner().run()
    assert toy.calls == ["a", "b", "c"]


@pytest.mark.parametrize("raised, status, said", [("KeyboardInterrupt", 130, "interrupted (Ctrl-C)"),
                                                  ("Terminated", 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("started_as", [["-m", "stopped_in_generated_code"], ["stopped_in_generated_code.py"]],
                         ids=["python-m", "script"])  # the `pipeline` command is a script
def test_a_stop_caught_after_it_left_generated_code_keeps_its_exit_status(tmp_path, raised, status, said, started_as):
    """A CI run of the SIGINT integrity test printed "interrupted (Ctrl-C)" and then died by
    SIGINT (status -2, not 130): the signal had landed in code built from a string (a
    dataclass's generated __init__ and the like), which CPython marks as an unhandled interrupt
    that `python -m` acts on at exit although the CLI caught it (a script exits another way)."""
    (tmp_path / "stopped_in_generated_code.py").write_text(
        "import sys\n"
        "from qlora_pipeline import cli\n"
        "from qlora_pipeline.errors import Terminated\n\n"
        "@cli.cli.command('stop')\n"
        "def stop():\n"
        f"    exec('raise {raised}')  # the signal landing in code that exec() runs\n\n"
        "sys.exit(cli.main(['stop']))\n")
    done = subprocess.run([sys.executable, *started_as], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == status, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == f"{said}; rerun the same command to resume"


@pytest.mark.parametrize("where", ["_load_checked", "_print_summary"])
def test_sigterm_anywhere_in_run_stops_it_with_143_and_the_message(tmp_path, where):
    """SIGTERM was turned into a clean stop only while stages ran: one landing while the recipe
    was checked and the run directory locked, or while the report and summary printed after
    the last stage, killed `pipeline run` silently (status -15; found by a soak sending Ctrl-C
    and SIGTERM at random moments)."""
    (tmp_path / "sigterm_in_run.py").write_text(
        "import os, signal, sys, types\n"
        "from pathlib import Path\n"
        "from qlora_pipeline import cli, preflight\n\n"
        "def terminated_here(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line\n"
        "    raise AssertionError('SIGTERM did not stop the run')\n\n"
        "# A run with no stages: the recipe, its checks and the runner stand in.\n"
        "cli._load_checked = lambda *a, **k: (None, None)\n"
        "preflight.run_problems = lambda cfg: []\n"
        "cli._runner = lambda *a, **k: types.SimpleNamespace(run_dir=Path('run'), tracker=None, cache=None,\n"
        "                                                   run=lambda **k: [])\n"
        f"cli.{where} = terminated_here\n"
        "sys.exit(cli.main(['run', 'recipe.yaml']))\n")
    done = subprocess.run([sys.executable, "-m", "sigterm_in_run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == "terminated (SIGTERM); rerun the same command to resume"


def test_an_interrupted_stage_without_checkpoints_says_it_restarts(toy):
    toy.crash_b_at, toy.crash_with = 0, KeyboardInterrupt  # before its first checkpoint (an evaluation keeps none)
    with pytest.raises(KeyboardInterrupt):
        toy.runner().run()
    plan = toy.runner().plan()
    assert (plan[1].status, plan[1].reason) == ("partial", "interrupted (Ctrl-C) before its first checkpoint; restarts")
    state = toy.run_dir / "b" / "state.json"
    for error in (None, 7):  # a state written by hand or damaged: no traceback (found in review)
        record = json.loads(state.read_text())
        record.pop("error", None) if error is None else record.update(error=error)
        state.write_text(json.dumps(record))
        assert toy.runner().plan()[1].reason == "interrupted before its first checkpoint; restarts"
    shutil.rmtree(toy.run_dir / "b" / "checkpoints")
    assert toy.runner().plan()[1].reason == "interrupted before it finished; runs again"


def test_ctrl_c_after_a_stage_is_published_leaves_it_done(toy, tmp_path):
    """Ctrl-C while the stage cache stored a published stage overwrote its state with "failed"
    beside a good manifest, and that stayed after the next run (found by QA)."""
    from qlora_pipeline.stagecache import StageCache

    class InterruptedStore(StageCache):
        def store(self, *args, **kwargs):
            raise KeyboardInterrupt

    runner = Runner(toy.run_dir, [StageSpec("a", toy.a, (), {"value": 1})], cache=InterruptedStore(tmp_path / "c"))
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    state = json.loads((toy.run_dir / "a" / "state.json").read_text())
    assert state["status"] == "done" and "error" not in state
    assert toy.runner().plan()[0].status == "done"


def test_checkpoints_of_another_configuration_are_discarded(toy):
    toy.crash_b_at = 2
    with pytest.raises(StageError):
        toy.runner().run()
    toy.crash_b_at = None
    toy.runner(b=7).run()
    assert toy.b_steps_done == [0, 1, 0, 1, 2, 3, 4]


def test_truncated_or_altered_output_is_detected_and_rerun(toy):
    toy.runner().run()
    target = toy.run_dir / "b" / "output" / "b.txt"
    target.write_text("a=1")  # truncated
    plan = toy.runner().plan()
    assert plan[1].status == "corrupt" and "truncated" in plan[1].reason
    toy.calls.clear()
    toy.runner().run()
    assert toy.calls == ["b"]  # b's rebuild reproduced its bytes: c is still up to date
    # Same size, different bytes, mtime kept: only the full verification can see it.
    bit_rot(target)
    assert toy.runner().plan()[1].status == "done"
    assert toy.runner().plan(full_verify=True)[1].status == "corrupt"


def test_a_file_added_to_a_published_output_makes_its_stage_rebuild(toy):
    """The manifest lists every published file: anything else in output/ was not made by the
    stage, and a downstream stage reading the folder would read it too."""
    toy.runner().run()
    (toy.run_dir / "a" / "output" / "planted.txt").write_text("not from a")
    plan = toy.runner().plan()
    assert plan[0].status == "corrupt" and plan[0].reason == "output altered: a/output/planted.txt: not in the manifest (added)"
    toy.calls.clear()
    toy.runner().run()
    assert toy.calls == ["a"] and not (toy.run_dir / "a" / "output" / "planted.txt").exists()


def test_removing_a_file_added_to_an_output_is_logged_naming_it(toy, caplog):
    toy.runner().run()
    (toy.run_dir / "a" / "output" / "planted.txt").write_text("the user's notes")
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline.runner"):
        toy.runner().run()
    assert "a: removing 1 file(s) not made by the stage from its output folder: a/output/planted.txt" in caplog.text


def test_a_stage_whose_inputs_lost_one_says_so(toy):
    """A quantize entry removed from the recipe: the report no longer reads it."""
    def specs(c_deps):
        return [StageSpec("a", toy.a, (), {"value": 1}), StageSpec("b", toy.b, ("a",), {"value": 1}),
                StageSpec("c", toy.c, c_deps, {"value": 1})]

    Runner(toy.run_dir, specs(("a", "b"))).run()
    planned = Runner(toy.run_dir, specs(("b",))).plan()
    assert planned[2].status == "stale" and planned[2].reason == "inputs changed: a no longer an input"
    Runner(toy.run_dir, specs(("b",))).run()
    assert Runner(toy.run_dir, specs(("a", "b"))).plan()[2].reason == "inputs changed: a now an input"


def test_a_hand_edited_manifest_fingerprint_is_named_as_the_reason(toy):
    toy.runner().run()
    path = toy.run_dir / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["fingerprint"] = "0" * 20
    path.write_text(json.dumps(manifest))
    reason = toy.runner().plan()[1].reason
    assert reason.startswith("its manifest's fingerprint does not match the settings, code and inputs it records")


@pytest.mark.parametrize("damage, problem", [
    ("no fingerprint", "has no 'fingerprint'"),
    ("no files", "has a malformed file table"),
    ("files a list", "has a 'files' that is not an object"),
    ("bad row", "has a malformed file table"),
    ("config a list", "has a 'config' that is not an object"),
    ("not json", "is unreadable (not valid JSON"),
    ("a list", "holds JSON that is not an object (a list)"),
])
def test_a_damaged_manifest_is_refused_until_deleted_then_its_stage_reruns(toy, damage, problem):
    """A manifest that is not a well-formed record (hand edits, a cut copy) is refused by the
    runner itself, the same rule the CLI applies: nothing is written, the file is named; once
    it is deleted, plan says why the stage runs and run rebuilds that stage alone."""
    toy.runner().run()
    path = toy.run_dir / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "no fingerprint":
        del manifest["fingerprint"]
    elif damage == "no files":
        del manifest["files"]
    elif damage == "files a list":
        manifest["files"] = ["b.txt"]
    elif damage == "bad row":
        manifest["files"]["b.txt"] = {"size": "8"}
    elif damage == "config a list":
        manifest["config"] = [1]
    path.write_text(json.dumps(manifest))
    if damage == "not json":
        path.write_text(path.read_text()[:40])
    if damage == "a list":
        path.write_text("[1, 2]")
    before = {p: p.stat().st_mtime_ns for p in toy.run_dir.rglob("*")}
    for attempt in (lambda: toy.runner().plan(), lambda: toy.runner().run()):
        with pytest.raises(InputError) as refused:
            attempt()
        assert f"{path} {problem}" in str(refused.value) and "delete it" in str(refused.value)
    assert {p: p.stat().st_mtime_ns for p in toy.run_dir.rglob("*")} == before, "nothing written"
    assert toy.calls == ["a", "b", "c"]

    path.unlink()
    plan = toy.runner().plan()
    assert [p.action for p in plan] == ["skip", "run", "run"]
    assert plan[1].reason.startswith("b/output has no manifest")
    toy.calls.clear()
    toy.runner().run()
    assert toy.calls == ["b"]  # rebuilt with the same bytes: c stays up to date
    assert [p.action for p in toy.runner().plan()] == ["skip"] * 3


def test_an_unreadable_checkpoint_fingerprint_is_no_resume_point(toy):
    toy.runner().run()
    (toy.run_dir / "b" / "manifest.json").unlink()
    (toy.run_dir / "b" / "checkpoints").mkdir()
    (toy.run_dir / "b" / "checkpoints" / ".fingerprint").write_bytes(b"\xff\xfe")
    assert toy.runner().plan()[1].action == "run"
    toy.calls.clear()
    toy.runner().run()
    assert toy.calls == ["b"]


def test_lock_blocks_a_live_process_and_takes_over_a_dead_one(tmp_path):
    lock_path = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time;"
        "from qlora_pipeline.rundir import RunLock; from pathlib import Path;"
        "l=RunLock(Path(%r)); l.acquire(); print('locked', flush=True); time.sleep(60)"
    ) % (str(lock_path),)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid}"):
            RunLock(lock_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and is taken over.
    assert json.loads(lock_path.read_text())["pid"] == holder.pid
    with RunLock(lock_path):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()


@pytest.mark.parametrize("pid", [-1, 0, True])
def test_a_lock_with_a_pid_no_process_has_is_stale_and_taken_over(tmp_path, pid):
    """os.kill(-1, 0) and os.kill(0, 0) succeed (they signal process groups): such a lock must
    not read as held by a live process forever."""
    lock_path = tmp_path / "run" / ".lock"
    lock_path.parent.mkdir()
    lock_path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with RunLock(lock_path):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert lock_is_stale({"pid": pid, "host": socket.gethostname()})


def test_status_line_of_a_lock_says_whether_it_is_stale():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    line = describe_lock({"pid": dead.pid, "host": socket.gethostname(), "started": "then"})
    assert line.startswith(f"stale lock left by pid {dead.pid} on {socket.gethostname()} since then")
    assert "the next run takes it over" in line
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    assert describe_lock(live) == f"lock held by pid {os.getpid()} on {socket.gethostname()} since now"
    assert describe_lock({**live, "host": "elsewhere"}).startswith("lock held by")  # cannot be checked


def test_a_lock_that_is_a_folder_is_refused_saying_to_remove_it(tmp_path):
    lock_path = tmp_path / "run" / ".lock"
    lock_path.mkdir(parents=True)
    with pytest.raises(InputError, match=r"\.lock is a folder, not a lock file .*; remove it \(rm -r ") as err:
        RunLock(lock_path).acquire()
    assert "try again" not in str(err.value)
    assert lock_path.is_dir()  # never removed for the user: it is not ours


def test_a_second_runner_in_the_same_dir_is_refused(toy):
    toy.run_dir.mkdir(parents=True)
    (toy.run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                    "proc_start": None}))
    with pytest.raises(RunLockedError):
        toy.runner().run()


# ----------------------------------------------------------------------------- content, code, verification



def test_rebuilt_upstream_with_identical_bytes_leaves_downstream_up_to_date(toy):
    toy.runner().run()
    toy.calls.clear()
    # Altered in place (mtime moves): `a` is rebuilt; its bytes come back the same.
    (toy.run_dir / "a" / "output" / "a.txt").write_text("a=9")
    planned = toy.runner().plan()
    assert [(p.spec.name, p.action) for p in planned] == [("a", "run"), ("b", "run"), ("c", "run")]
    assert planned[0].reason.startswith("output altered: a/output/a.txt")
    assert "after a" in planned[1].reason and "up to date" not in planned[1].reason
    done = toy.runner().run()
    assert toy.calls == ["a"]
    assert [p.outcome for p in done] == ["ran", "skipped", "skipped"]
    assert "identical output" in done[1].reason


def test_changed_upstream_output_reruns_downstream_with_the_reason(toy):
    toy.runner().run()
    toy.calls.clear()
    planned = toy.runner(a=2).plan()
    assert planned[0].reason == "settings changed: value"
    done = toy.runner(a=2).run()
    assert toy.calls == ["a", "b", "c"]
    assert done[1].reason == "input changed: a" and done[2].reason == "input changed: b"


def test_altered_input_with_mtime_restored_is_rebuilt_before_it_is_read(toy):
    toy.runner().run()
    target = toy.run_dir / "b" / "output" / "b.txt"
    bit_rot(target)
    toy.calls.clear()
    planned = toy.runner(c=2).plan()  # c must run, and it reads b
    assert [(p.spec.name, p.action, p.status) for p in planned][1] == ("b", "run", "corrupt")
    assert "output altered: b/output/b.txt" in planned[1].reason and "before c read it" in planned[1].reason
    toy.runner(c=2).run()
    assert toy.calls == ["b", "c"]
    assert (toy.run_dir / "c" / "output" / "c.txt").read_text() == "a=1 b=1 c"  # computed on good bytes


def test_verification_can_be_switched_off(toy):
    toy.runner().run()
    target = toy.run_dir / "b" / "output" / "b.txt"
    bit_rot(target)
    runner = toy.runner(c=2)
    runner.verify_inputs = False
    assert [p.action for p in runner.plan()] == ["skip", "skip", "run"]


def test_only_refuses_an_altered_input_naming_the_file(toy):
    toy.runner().run()
    target = toy.run_dir / "a" / "output" / "a.txt"
    bit_rot(target)
    with pytest.raises(InputError, match="a/output/a.txt"):  # refused: a damaged run directory, nothing ran
        toy.runner().run(only="b", force=True)


STAGE_MODULE = '''
from qlora_pipeline.graph import StageResult


def produce(ctx):
    (ctx.output_dir / "x.txt").write_text("x=" + str(ctx.config["value"] * FACTOR))
    return StageResult()


FACTOR = 2
'''


def _module_runner(tmp_path, source: str) -> Runner:
    import importlib.util

    path = tmp_path / "stagemod.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("stagemod", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Runner(tmp_path / "run", [StageSpec("x", module.produce, (), {"value": 1})])


def test_code_change_makes_a_stage_stale_and_names_the_file(tmp_path):
    _module_runner(tmp_path, STAGE_MODULE).run()
    # Comments, docstrings and formatting are not code.
    restyled = STAGE_MODULE.replace("def produce(ctx):", 'def produce(ctx):  # writes x\n    """Doc."""\n')
    assert _module_runner(tmp_path, restyled).plan()[0].action == "skip"
    changed = STAGE_MODULE.replace("FACTOR = 2", "FACTOR = 3")
    planned = _module_runner(tmp_path, changed).plan()
    assert planned[0].action == "run" and planned[0].reason == f"code changed: {tmp_path / 'stagemod.py'}"


EDITING_STAGE = '''
from pathlib import Path

from qlora_pipeline.graph import StageResult


def first(ctx):
    # What an editor or a `git checkout` does while a long run goes on: the next stage's source changes.
    later = Path(ctx.config["later"])
    later.write_text(later.read_text().replace("FACTOR = 2", "FACTOR = 3"))
    (ctx.output_dir / "a.txt").write_text("a")
    return StageResult()
'''

EDITED_STAGE = '''
from qlora_pipeline.graph import StageResult


def second(ctx):
    (ctx.output_dir / "b.txt").write_text("b=" + str(FACTOR))
    return StageResult()


FACTOR = 2
'''


def _import(path, source=None):
    import importlib.util

    if source is not None:
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_edited_during_a_run_leaves_no_stage_up_to_date_or_cached_for_it(tmp_path):
    """A stage runs the code the process imported when the run started. A source file edited
    while the run goes on must not be recorded as the code of what ran: the next run finds the
    stage stale, and the stage cache keeps nothing under the edited code's fingerprint."""
    from qlora_pipeline.stagecache import StageCache

    later = tmp_path / "later.py"
    first, second = _import(tmp_path / "editing.py", EDITING_STAGE), _import(later, EDITED_STAGE)
    cache = StageCache(tmp_path / "cache")
    specs = lambda second: [StageSpec("first", first.first, (), {"later": str(later)}),
                            StageSpec("second", second.second, ("first",), {})]
    Runner(tmp_path / "run", specs(second), cache=cache).run()
    assert (tmp_path / "run" / "second" / "output" / "b.txt").read_text() == "b=2"  # the code imported at start
    assert "FACTOR = 3" in later.read_text()
    cached = {p.name for p in (tmp_path / "cache").iterdir()}

    planned = {p.spec.name: p for p in Runner(tmp_path / "run", specs(_import(later)), cache=cache).plan()}
    assert planned["first"].action == "skip"
    assert planned["second"].action == "run" and planned["second"].reason == f"code changed: {later}"
    # In a fresh run directory, nothing comes from the cache for the edited code either.
    fresh = {p.spec.name: p for p in Runner(tmp_path / "fresh", specs(_import(later)), cache=cache).plan()}
    assert fresh["first"].action == "cache" and fresh["second"].action == "run"
    assert len(cached) == 1  # `first` only: which version of its code `second` ran is not known

    # With the source left alone from the start of a run to the end, the edited code is recorded.
    Runner(tmp_path / "run", specs(_import(later)), cache=cache).run()
    assert (tmp_path / "run" / "second" / "output" / "b.txt").read_text() == "b=3"
    assert Runner(tmp_path / "run", specs(_import(later)), cache=cache).plan()[1].action == "skip"


def test_an_upgraded_library_makes_the_stages_that_import_it_stale(tmp_path, monkeypatch):
    from qlora_pipeline import codehash

    uses_torch = STAGE_MODULE.replace("from qlora_pipeline.graph import StageResult",
                                      "import torch.nn\nfrom qlora_pipeline.graph import StageResult")
    _module_runner(tmp_path, uses_torch).run()
    assert _module_runner(tmp_path, uses_torch).plan()[0].action == "skip"
    installed, real = codehash.installed_version("torch"), codehash.installed_version
    monkeypatch.setattr(codehash, "installed_version", lambda dist: "99.0" if dist == "torch" else real(dist))
    planned = _module_runner(tmp_path, uses_torch).plan()
    assert planned[0].action == "run"
    assert planned[0].reason == f"code changed: library torch {installed} -> 99.0"
    # A stage whose code does not import the library is not touched by its upgrade.
    plain = tmp_path / "plain"
    plain.mkdir()
    _module_runner(plain, STAGE_MODULE).run()
    monkeypatch.setattr(codehash, "installed_version", lambda dist: "100.0")
    assert _module_runner(plain, STAGE_MODULE).plan()[0].action == "skip"


def test_library_versions_follow_the_imports_of_a_stage_s_code():
    from qlora_pipeline.codehash import installed_version, library_versions

    data_libs = library_versions("qlora_pipeline.stages.data")
    # the data stage tokenizes with transformers, so tokenizers' version counts too
    assert data_libs["library transformers"] == installed_version("transformers")
    assert data_libs["library tokenizers"] == installed_version("tokenizers")
    assert "library peft" not in data_libs and "library mlflow" not in data_libs
    assert "library peft" in library_versions("qlora_pipeline.stages.train")
    assert library_versions("qlora_pipeline.stages.report") == {"library matplotlib": installed_version("matplotlib")}


def test_every_dependency_is_classified_as_shaping_outputs_or_not():
    """A library added to pyproject.toml must be put in OUTPUT_LIBRARIES (its version counts as
    code) or NO_OUTPUT_LIBRARIES (with the reason it cannot change an output), never neither."""
    import re
    import tomllib

    from qlora_pipeline.codehash import NO_OUTPUT_LIBRARIES, OUTPUT_LIBRARIES, ROOT

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("-", "_") for d in declared}
    shaping = {dist for dists in OUTPUT_LIBRARIES.values() for dist in dists}
    assert not shaping & set(NO_OUTPUT_LIBRARIES), "in both tables"
    unclassified = names - shaping - set(NO_OUTPUT_LIBRARIES)
    assert not unclassified, f"classify in pipeline/codehash.py: {sorted(unclassified)}"
    assert all(reason for reason in NO_OUTPUT_LIBRARIES.values())


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_cleanly_and_resumes(small_disk, tmp_path):
    big = {"n": 600_000}

    def a(ctx):
        (ctx.output_dir / "a.bin").write_bytes(b"a" * 1000)
        return StageResult()

    def b(ctx):
        for part in range(3):  # checkpointed progress survives the failure
            shard = ctx.checkpoint_dir / f"part-{part}"
            if not shard.exists():
                tmp = shard.with_name(shard.name + ".tmp")
                tmp.write_bytes(bytes([part]) * (big["n"] // 3))
                tmp.rename(shard)
        data = b"".join((ctx.checkpoint_dir / f"part-{i}").read_bytes() for i in range(3))
        (ctx.output_dir / "b.bin").write_bytes(data)
        return StageResult()

    specs = [StageSpec("a", a, (), {}), StageSpec("b", b, ("a",), {})]
    with pytest.raises(StageError, match=r"no space left on device while writing .*b"):
        Runner(small_disk / "run", specs).run()
    left = [p.name for p in (small_disk / "run").rglob("*")]
    assert not any(".tmp" in n for n in left) and "output.partial" not in left
    assert not (small_disk / "run" / "b" / "manifest.json").exists()
    assert (small_disk / "run" / "a" / "manifest.json").exists()
    # Space freed: the same command resumes from the shards and ends as an uninterrupted run.
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    Runner(small_disk / "run", specs).run()
    Runner(tmp_path / "reference", specs).run()
    for stage, name in (("a", "a.bin"), ("b", "b.bin")):
        assert (small_disk / "run" / stage / "output" / name).read_bytes() == \
            (tmp_path / "reference" / stage / "output" / name).read_bytes()
    assert not any(".tmp" in p.name for p in (small_disk / "run").rglob("*"))


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run(tmp_path):
    """kill -9 between an atomic write and its rename left `.state.json.tmp-<pid>` in a stage
    folder for good (found by the kill -9 soak test under load)."""
    def a(ctx):
        (ctx.output_dir / "a.txt").write_text("a")
        return StageResult()

    runner = Runner(tmp_path / "run", [StageSpec("a", a, (), {})])
    runner.run()
    leftovers = [tmp_path / "run" / "a" / ".state.json.tmp-99999", tmp_path / "run" / ".run.json.tmp-12"]
    for path in leftovers:
        path.write_text("{half")
    runner.run()
    assert not any(path.exists() for path in leftovers)
    assert (tmp_path / "run" / "a" / "output" / "a.txt").read_text() == "a"


def test_bad_input_found_by_a_stage_leaves_no_run_directory(tmp_path, caplog):
    def a(ctx):
        (ctx.output_dir / "a.txt").write_text("a")
        return StageResult()

    def b(ctx):
        raise InputError("data.domain: unreadable")

    # Refused by the first stage: the run directory this command made goes.
    first = Runner(tmp_path / "run", [StageSpec("b", b, (), {})])
    with pytest.raises(InputError):
        first.run()
    assert not (tmp_path / "run").exists()
    # Refused after a stage finished: that stage's work is kept (it was removed with the run
    # directory this command had made: hours of training lost to a problem found later).
    runner = Runner(tmp_path / "run", [StageSpec("a", a, (), {}), StageSpec("b", b, ("a",), {})])
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline.runner"), pytest.raises(InputError):
        runner.run()
    assert (tmp_path / "run" / "a" / "output" / "a.txt").read_text() == "a"
    assert not (tmp_path / "run" / "b" / "output").exists()
    assert "1 stage(s) finished before the refusal (a)" in caplog.text
    assert [p.status for p in runner.plan()] == ["done", "missing"]
    # An existing run directory keeps what it had; the failing stage leaves nothing behind.
    import shutil

    shutil.rmtree(tmp_path / "run")
    ok = Runner(tmp_path / "run", [StageSpec("a", a, (), {})])
    ok.run()
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "run").rglob("*"))
    run_json = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(InputError):
        runner.run()
    after = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "run").rglob("*"))
    assert after == before and (tmp_path / "run" / "run.json").read_bytes() == run_json


def test_a_stage_that_names_its_run_directory_reruns_in_a_copy(tmp_path):
    """The report's title is its run directory's name, which its settings did not hold: a
    copied or renamed run directory kept the old title and called the report up to date."""
    calls = []

    def plain(ctx):
        calls.append("plain")
        (ctx.output_dir / "p.txt").write_text("p")
        return StageResult()

    def titled(ctx):
        calls.append(ctx.run_dir.name)
        (ctx.output_dir / "title.txt").write_text(ctx.run_dir.name)
        return StageResult()

    def runner(run_dir):
        return Runner(run_dir, [StageSpec("plain", plain, (), {"v": 1}),
                                StageSpec("titled", titled, ("plain",), {"v": 1}, cacheable=False,
                                          names_run_dir=True)])

    runner(tmp_path / "one").run()
    assert calls == ["plain", "one"]
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    calls.clear()
    plan = {p.spec.name: p for p in runner(tmp_path / "two").plan()}
    assert (plan["plain"].action, plan["titled"].action) == ("skip", "run")
    assert "settings changed: run_dir_name" in plan["titled"].reason
    runner(tmp_path / "two").run()
    assert calls == ["two"] and (tmp_path / "two" / "titled" / "output" / "title.txt").read_text() == "two"
    runner(tmp_path / "one").run()  # the original is still up to date
    assert calls == ["two"]
