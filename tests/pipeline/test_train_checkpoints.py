"""Training checkpoints sealed with a record of their files: a resume never loads a damaged or
incomplete one, takes the newest intact one instead, and says which it skipped and why."""
from __future__ import annotations

import json
import logging

import pytest

from qlora_pipeline import rundir
from qlora_pipeline.graph import StageResult, StageSpec
from qlora_pipeline.runner import Runner
from qlora_pipeline.stages.train import STEP_DIR, resume_point


def sealed_step(ckpt_dir, step: int, payload: bytes = b"weights" * 100):
    folder = ckpt_dir / STEP_DIR.format(step)
    folder.mkdir(parents=True)
    (folder / "adapter.safetensors").write_bytes(payload)
    (folder / "trainer.json").write_text(json.dumps({"step": step}))
    (folder / "trainer.safetensors").write_bytes(b"state" * 10)
    rundir.seal_checkpoint(folder, step=step)
    return folder


def flip_a_byte(path, offset: int = 50) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(data)


def test_a_sealed_checkpoint_verifies_until_a_file_is_cut_or_altered(tmp_path):
    folder = sealed_step(tmp_path, 5)
    record = json.loads((folder / rundir.CHECKPOINT_RECORD).read_text())
    assert set(record["files"]) == {"adapter.safetensors", "trainer.json", "trainer.safetensors"} and record["step"] == 5
    assert rundir.checkpoint_problems(folder) == []
    flip_a_byte(folder / "adapter.safetensors")
    assert rundir.checkpoint_problems(folder, full=False) == []  # same size: only hashing tells
    assert "adapter.safetensors: sha256 differs" in rundir.checkpoint_problems(folder)[0]
    (folder / "trainer.json").write_text("garbage")
    assert any("trainer.json: size" in p for p in rundir.checkpoint_problems(folder, full=False))


def test_a_record_that_leaves_out_a_required_file_is_damaged(tmp_path):
    folder = sealed_step(tmp_path, 5)
    (folder / rundir.CHECKPOINT_RECORD).write_text(json.dumps({"step": 5, "files": {}}))
    assert rundir.checkpoint_problems(folder) == []
    assert rundir.checkpoint_problems(folder, required=("adapter.safetensors",)) == [
        f"{folder / 'adapter.safetensors'}: not in its checkpoint record"]


@pytest.mark.parametrize("record", [None, "20", "{not json", json.dumps({"step": 20})])
def test_a_checkpoint_without_a_valid_record_is_incomplete(tmp_path, record):
    folder = sealed_step(tmp_path, 20)
    if record is None:
        (folder / rundir.CHECKPOINT_RECORD).unlink()
        assert not rundir.is_sealed(folder)
    else:
        (folder / rundir.CHECKPOINT_RECORD).write_text(record)
    assert "no valid record of its files" in rundir.checkpoint_problems(folder)[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage trainer.json", "unsealed"])
def test_resume_takes_the_newest_intact_checkpoint_and_removes_newer_damaged_ones(tmp_path, caplog, damage):
    sealed_step(tmp_path, 10)
    sealed_step(tmp_path, 15)
    newest = sealed_step(tmp_path, 20)
    if damage == "truncate":
        (newest / "adapter.safetensors").write_bytes(b"x" * 100)
    elif damage == "flip":
        flip_a_byte(newest / "adapter.safetensors")
    elif damage == "garbage trainer.json":
        (newest / "trainer.json").write_text("{garbage")
    else:
        (newest / rundir.CHECKPOINT_RECORD).unlink()  # killed before its record was written
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path) == tmp_path / "step-0000015"
    assert not newest.exists()
    assert "checkpoint step-0000020 is damaged or incomplete" in caplog.text
    assert str(newest) in caplog.text  # names the file, or the missing record


def test_resume_starts_over_with_a_warning_when_no_checkpoint_is_intact(tmp_path, caplog):
    for step in (5, 10):
        flip_a_byte(sealed_step(tmp_path, step) / "adapter.safetensors")
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path) is None
    assert "no intact checkpoint" in caplog.text and "starts over" in caplog.text
    assert not list(tmp_path.glob("step-*"))


def test_a_rank_other_than_the_main_one_skips_damaged_checkpoints_without_removing_them(tmp_path):
    sealed_step(tmp_path, 5)
    flip_a_byte(sealed_step(tmp_path, 10) / "adapter.safetensors")
    assert resume_point(tmp_path, discard=False) == tmp_path / "step-0000005"
    assert (tmp_path / "step-0000010").exists()


class Sealer:
    """One stage that writes a sealed checkpoint per step and can crash midway."""

    def __init__(self, tmp_path):
        self.run_dir = tmp_path / "run"
        self.crash_at: int | None = None
        self.steps_done: list[int] = []

    def stage(self, ctx):
        start = resume_point(ctx.checkpoint_dir)
        first = 0 if start is None else json.loads((start / rundir.CHECKPOINT_RECORD).read_text())["step"] + 1
        for step in range(first, 4):
            if self.crash_at == step:
                raise RuntimeError("simulated crash")
            self.steps_done.append(step)
            sealed_step(ctx.checkpoint_dir, step)
        (ctx.output_dir / "done.txt").write_text("done")
        return StageResult()

    def runner(self) -> Runner:
        return Runner(self.run_dir, [StageSpec("s", self.stage, (), {"value": 1})])


def test_plan_does_not_promise_a_resume_from_a_damaged_checkpoint(tmp_path):
    sealer = Sealer(tmp_path)
    sealer.crash_at = 3
    with pytest.raises(Exception, match="simulated crash"):
        sealer.runner().run()
    ckpt = sealer.run_dir / "s" / rundir.CHECKPOINTS
    sealer.run_dir.joinpath("s", rundir.STATE).unlink()  # as after a kill -9: no "failed" state
    assert sealer.runner().plan()[0].reason == "interrupted; resumes from checkpoint step-0000002"
    (ckpt / "step-0000002" / "adapter.safetensors").write_bytes(b"x")
    assert sealer.runner().plan()[0].reason == \
        "interrupted; resumes from checkpoint step-0000001 (step-0000002 damaged: skipped)"
    flip_a_byte(ckpt / "step-0000001" / "adapter.safetensors")
    assert sealer.runner().plan()[0].reason.startswith("interrupted; resumes from checkpoint step-0000001")
    assert sealer.runner().plan(full_verify=True)[0].reason.startswith(
        "interrupted; resumes from checkpoint step-0000000")
    for folder in ckpt.glob("step-*"):
        (folder / "trainer.json").write_text("")
    reason = sealer.runner().plan()[0].reason
    assert reason.startswith("interrupted; no intact checkpoint (3 damaged, e.g. s/checkpoints/step-0000000/")
    assert reason.endswith("; restarts")
    sealer.crash_at = None
    sealer.steps_done.clear()
    sealer.runner().run()
    assert sealer.steps_done == [0, 1, 2, 3]
