"""The stage runner on small pure-Python stages: skip, re-run what changed, resume, corruption, lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.errors import InputError, RunLockedError, StageError
from pipeline.graph import StageResult, StageSpec
from pipeline.rundir import RunLock
from pipeline.runner import Runner


class Toy:
    """Three stages a -> b -> c; b counts in checkpoints and can be told to crash midway."""

    def __init__(self, tmp_path):
        self.run_dir = tmp_path / "run"
        self.calls: list[str] = []
        self.crash_b_at: int | None = None
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
                raise RuntimeError("simulated crash")
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
            StageSpec("a", self.a, (), {"value": a}, 1),
            StageSpec("b", self.b, ("a",), {"value": b}, 1),
            StageSpec("c", self.c, ("b",), {"value": c}, 1),
        ]
        return Runner(self.run_dir, specs, recipe=None)


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
    assert toy.calls == ["b", "c"]
    # Same size, different bytes, mtime kept: only the full verification can see it.
    st = target.stat()
    target.write_text("X" * st.st_size)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert toy.runner().plan()[1].status == "done"
    assert toy.runner().plan(full_verify=True)[1].status == "corrupt"


def test_lock_blocks_a_live_process_and_takes_over_a_dead_one(tmp_path):
    lock_path = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; sys.path.insert(0, %r);"
        "from pipeline.rundir import RunLock; from pathlib import Path;"
        "l=RunLock(Path(%r)); l.acquire(); print('locked', flush=True); time.sleep(60)"
    ) % (os.getcwd(), str(lock_path))], stdout=subprocess.PIPE, text=True)
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


def test_a_second_runner_in_the_same_dir_is_refused(toy):
    toy.run_dir.mkdir(parents=True)
    (toy.run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                    "proc_start": None}))
    with pytest.raises(RunLockedError):
        toy.runner().run()
