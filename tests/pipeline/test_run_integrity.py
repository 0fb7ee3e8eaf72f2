"""A run directory that can be trusted: the same work gives the same bytes, kill -9 at any
moment resumes to an uninterrupted run's outputs, an altered file rebuilds exactly its stage,
and nothing in a run directory is ever unpickled.

All on the tiny random Llama with every stage kind (data, base, train, merge, calibrate, RTN,
GPTQ and AWQ quantization, evaluations, report), each pipeline in a fresh process.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts.output_digests import outputs, sha256
from tests.conftest import REPO, tiny_recipe

QUANTIZE = [
    {"name": "rtn", "method": "rtn", "bits": 4, "group_size": 32},
    {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 32, "desc_act": True},
    {"name": "awq", "method": "awq", "bits": 4, "group_size": 32, "awq": {"search_windows": 2}},
    {"name": "awq-gptq", "method": "awq+gptq", "bits": 4, "group_size": 32, "awq": {"search_windows": 2}},
]
# Measurements, not results: they differ from run to run by nature.
def soak_recipe(model_dir: Path, tmp: Path, name: str) -> Path:
    recipe = tiny_recipe(
        model_dir, tmp, run={"name": name}, tracking={"enabled": False},
        train={"steps": 8, "save_interval": 2, "eval_interval": 4},
        calibration={"samples": 4, "seq_len": 64},
        evaluate={"max_domain_windows": 2, "max_general_windows": 2, "speed": False, "prompts": []},
    )
    recipe["quantize"] = QUANTIZE
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def start(recipe: Path, cwd: Path, *extra: str, hash_seed: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed or str(random.randrange(1 << 30))}
    return subprocess.Popen([sys.executable, "-m", "qlora_pipeline.cli", "run", str(recipe), *extra], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return err


def manifest_times(run_dir: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/manifest.json")}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory) -> Path:
    """One uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    finish(start(soak_recipe(tiny_llama_dir, tmp, "ref"), tmp, hash_seed="1"))
    return tmp / "runs" / "ref"


def test_same_work_gives_the_same_bytes_in_fresh_processes(reference, tiny_llama_dir, tmp_path):
    finish(start(soak_recipe(tiny_llama_dir, tmp_path, "again"), tmp_path, hash_seed="2"))
    ours, ref = outputs(tmp_path / "runs" / "again"), outputs(reference)
    assert ours.keys() == ref.keys()
    differing = [k for k in ref if ours[k] != ref[k]]
    assert not differing, differing


def test_kill_9_at_random_moments_across_stage_kinds_resumes_to_the_same_outputs(reference, tiny_llama_dir, tmp_path):
    recipe = soak_recipe(tiny_llama_dir, tmp_path, "soak")
    run_dir = tmp_path / "runs" / "soak"
    rng = random.Random(20261130)
    killed_in = []
    for target in ("base", "train", "merge", "quantize-gptq", "awq-search-w4g32", "quantize-awq", "evaluate-merged",
                   "report"):
        proc = start(recipe, tmp_path)
        state = run_dir / target / "state.json"
        while proc.poll() is None:
            try:
                if json.loads(state.read_text()).get("status") == "running":
                    time.sleep(rng.uniform(0.0, 0.4))  # a random moment inside the stage
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed_in.append(target)
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.01)
        proc.wait()
    assert len(killed_in) >= 4, f"the kills should land inside stages; landed in {killed_in}"
    finish(start(recipe, tmp_path))
    ours, ref = outputs(run_dir), outputs(reference)
    assert ours.keys() == ref.keys()
    differing = [k for k in ref if ours[k] != ref[k]]
    assert not differing, differing
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name == "output.partial"]


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_a_run_cleanly_and_it_resumes_to_the_same_outputs(stop, reference, tiny_llama_dir,
                                                                                   tmp_path):
    """SIGTERM (a scheduler's time limit, `docker stop`) killed a run as kill -9 does: no
    message, its lock, a stage recorded as running, `output.partial/` left behind; Ctrl-C said
    only "aborted" (click's word for it) and recorded the stage as failed (found by QA)."""
    recipe = soak_recipe(tiny_llama_dir, tmp_path, "stopped")
    run_dir = tmp_path / "runs" / "stopped"
    env = {**os.environ, "PYTHONHASHSEED": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_pipeline.cli", "run", str(recipe)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored, as in a shell
    state = run_dir / "train" / "state.json"
    while proc.poll() is None:
        try:
            if json.loads(state.read_text()).get("status") == "running" and list(state.parent.glob("checkpoints/*")):
                proc.send_signal(getattr(signal, stop))
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    said = {"SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "terminated (SIGTERM)"}[stop]
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[stop], err
    assert f"{said}; rerun the same command to resume" in err and "Traceback" not in err, err
    assert json.loads(state.read_text())["status"] == "interrupted"
    assert not (run_dir / ".lock").exists() and not (run_dir / "train" / "output.partial").exists()
    status = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "status", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert f"{said}; resumes from" in status.stdout or f"{said} before its first checkpoint" in status.stdout, \
        status.stdout
    finish(start(recipe, tmp_path))
    ours, ref = outputs(run_dir), outputs(reference)
    assert ours.keys() == ref.keys() and not [k for k in ref if ours[k] != ref[k]]


@pytest.mark.slow  # a dozen pipeline processes, each starting torch: 1-2 min on 2 cores
def test_ctrl_c_and_sigterm_at_random_moments_stop_cleanly_and_resume_to_the_same_outputs(reference, tiny_llama_dir,
                                                                                          tmp_path):
    """The test above stops training at one chosen moment; this one stops a whole run, again and
    again, at random moments (while the recipe is checked, in any stage, between stages, while
    the report prints): it found a SIGTERM outside the stages killing the run silently, and a
    Ctrl-C that landed in exec()'d code turning exit 130 into death by SIGINT."""
    recipe = soak_recipe(tiny_llama_dir, tmp_path, "soak")
    run_dir = tmp_path / "runs" / "soak"
    rng = random.Random(20261205)
    stops = []
    for _ in range(40):
        proc = start(recipe, tmp_path)
        stop = rng.choice(["SIGINT", "SIGTERM"])
        time.sleep(rng.uniform(0.2, 12.0))
        if proc.poll() is None:
            proc.send_signal(getattr(signal, stop))
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        last = err.rstrip().splitlines()[-1]
        if proc.returncode < 0:  # in the interpreter's own shutdown, after the last stage: it dies by the signal
            assert re.match(r"report +done ", last), err
            break
        stops.append(stop)
        said = {"SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "terminated (SIGTERM)"}[stop]
        assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[stop], err
        assert last == f"{said}; rerun the same command to resume" and "Traceback" not in err, err
        assert not [p for p in run_dir.glob("*/state.json") if json.loads(p.read_text())["status"] == "running"]
        assert not (run_dir / ".lock").exists() and not list(run_dir.glob("*/output.partial"))
    else:
        finish(start(recipe, tmp_path))
    assert len(stops) >= 3, f"the run finished before most signals: {stops}"
    ours, ref = outputs(run_dir), outputs(reference)
    assert ours.keys() == ref.keys() and not [k for k in ref if ours[k] != ref[k]]


def copy_run(reference: Path, tmp_path: Path, runs: Path | None = None) -> tuple[Path, Path]:
    """A copy of the reference run under `runs` (default tmp_path/runs) and its recipe pointing there."""
    runs = runs or tmp_path / "runs"
    run_dir = runs / "ref"
    shutil.copytree(reference, run_dir, symlinks=True)
    recipe = yaml.safe_load((reference.parent.parent / "ref.yaml").read_text())
    recipe["run"]["dir"] = str(runs)
    recipe_path = tmp_path / "ref.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_dir, recipe_path


STAGE_FILES = {  # one output file of each stage kind, and what must run after altering it
    "data": ("tokens.safetensors", {"data"}),
    "base": ("model-*.safetensors", {"base"}),
    "train": ("adapter_model.safetensors", {"train"}),
    "merge": ("model-*.safetensors", {"merge"}),
    "calibrate": ("calibration.safetensors", {"calibrate"}),
    "quantize-gptq": ("model-*.safetensors", {"quantize-gptq"}),
    "awq-search-w4g32": ("awq-*.safetensors", {"awq-search-w4g32"}),
    # An evaluation measures timings again, so the report that shows them is rebuilt too.
    "evaluate-awq": ("metrics.json", {"evaluate-awq", "report"}),
    "report": ("report.md", {"report"}),
}


def test_an_altered_output_file_rebuilds_exactly_its_stage(reference, tmp_path):
    run_dir, recipe_path = copy_run(reference, tmp_path)
    for stage, (pattern, expected) in STAGE_FILES.items():
        target = sorted((run_dir / stage / "output").glob(pattern))[0]
        name = target.name
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte; the file is rewritten, so its mtime moves
        target.write_bytes(bytes(data))
        before = manifest_times(run_dir)
        err = finish(start(recipe_path, tmp_path))
        after = manifest_times(run_dir)
        ran = {s for s in after if after[s] != before.get(s)}
        assert ran == expected, (stage, ran, [line for line in err.splitlines() if " run " in line])
        assert re.search(rf"{re.escape(stage)}\s+run\s+\(output altered: {re.escape(stage)}/output/{re.escape(name)}", err)
        assert "run   (up to date" not in err
        assert sha256(target) != hashlib.sha256(bytes(data)).hexdigest()


def test_altered_merge_with_its_mtime_restored_is_never_computed_on(reference, tmp_path):
    run_dir, recipe_path = copy_run(reference, tmp_path)
    target = sorted((run_dir / "merge" / "output").glob("model-*.safetensors"))[-1]
    good = target.read_bytes()
    st = target.stat()
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    target.write_bytes(bytes(bad))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: size and mtime as recorded
    # --only cannot rebuild the merge: it refuses, naming the file, and computes nothing.
    proc = start(recipe_path, tmp_path, "--only", "quantize-rtn", "--force")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and f"merge/output/{target.name}" in err, err  # refused: nothing ran
    assert "Traceback" not in err
    # A run that re-quantizes rebuilds the merge first, then quantizes the good bytes.
    before = manifest_times(run_dir)
    err = finish(start(recipe_path, tmp_path, "--from", "quantize-rtn"))
    after = manifest_times(run_dir)
    assert {"merge", "quantize-rtn"} <= {s for s in after if after[s] != before[s]}
    assert target.read_bytes() == good
    for path in (reference / "quantize-rtn" / "output").glob("*.safetensors"):
        assert sha256(run_dir / "quantize-rtn" / "output" / path.name) == sha256(path)


def test_altered_merge_is_rebuilt_when_training_re_runs_to_the_same_adapter(reference, tmp_path):
    """The merge waits on a training run whose adapter comes out byte-identical: it is then up
    to date by its fingerprint, but its own output, altered with the mtime put back, must be
    hashed before the quantizers read it (it was due to run when planning hashed inputs)."""
    run_dir, recipe_path = copy_run(reference, tmp_path)
    target = sorted((run_dir / "merge" / "output").glob("model-*.safetensors"))[-1]
    good = target.read_bytes()
    st = target.stat()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    target.write_bytes(bytes(bad))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = manifest_times(run_dir)
    for record in ("manifest.json", "state.json"):  # training runs again (unrecorded), to the same bytes
        (run_dir / "train" / record).unlink()
    err = finish(start(recipe_path, tmp_path))
    after = manifest_times(run_dir)
    assert {"train", "merge"} <= {s for s in after if after[s] != before.get(s)}, err
    assert re.search(r"train\s+run\s+\(train/output has no manifest", err), err
    assert re.search(rf"merge\s+run\s+\(output altered: merge/output/{re.escape(target.name)}", err), err
    assert target.read_bytes() == good
    for stage in ("quantize-rtn", "quantize-gptq"):  # computed on the good bytes, or not at all
        for path in (reference / stage / "output").glob("*.safetensors"):
            assert sha256(run_dir / stage / "output" / path.name) == sha256(path)


class _Payload:
    """Unpickling this creates a marker file: proof that the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_trainer_pickle_is_never_executed(reference, tmp_path):
    run_dir, recipe_path = copy_run(reference, tmp_path)
    # Make train look interrupted after step 6, with a crafted checkpoint of the old format.
    fp = json.loads((run_dir / "train" / "manifest.json").read_text())["fingerprint"]
    (run_dir / "train" / "manifest.json").unlink()
    shutil.rmtree(run_dir / "train" / "output")
    step = run_dir / "train" / "checkpoints" / "step-0000006"
    step.mkdir(parents=True)
    (run_dir / "train" / "checkpoints" / ".fingerprint").write_text(fp)
    marker = tmp_path / "pwned"
    (step / "trainer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))
    (step / "complete").write_text("6")
    shutil.copy(reference / "train" / "output" / "adapter_model.safetensors", step / "adapter.safetensors")
    finish(start(recipe_path, tmp_path))
    assert not marker.exists()
    # Training started over (the crafted checkpoint is not one) and reproduced the adapter.
    assert sha256(run_dir / "train" / "output" / "adapter_model.safetensors") == \
        sha256(reference / "train" / "output" / "adapter_model.safetensors")


PICKLE_LOADS = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                          r"import\s+(c?pickle|dill|joblib)\b")


def test_nothing_in_the_project_loads_a_pickle():
    offenders = []
    for folder in ("pipeline", "quant", "qlora_kernels", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if PICKLE_LOADS.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, offenders


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_disk_full_in_the_middle_of_a_quantize_stage_then_resume(reference, tmp_path):
    """ENOSPC while GPTQ writes its layers: exit 1 with a clear line, nothing half-written left;
    after space is freed the same command resumes and gives the uninterrupted run's bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    stage_bytes = _tree_bytes(reference / "quantize-gptq" / "output")
    size_kb = 2 * _tree_bytes(reference) // 1024 + 65536  # roomy; a filler file takes the rest
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run_dir, recipe_path = copy_run(reference, tmp_path, disk / "runs")
        for stage in ("quantize-gptq", "evaluate-gptq", "report"):
            shutil.rmtree(run_dir / stage)
        # Fill what is left but about half of the stage's output.
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - stage_bytes // 2))
        proc = start(recipe_path, tmp_path, "--only", "quantize-gptq")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err
        assert "no space left on device while writing" in err and "Traceback" not in err
        assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name == "output.partial"]
        assert not (run_dir / "quantize-gptq" / "manifest.json").exists()
        (disk / "filler").unlink()  # space freed
        finish(start(recipe_path, tmp_path))
        ours, ref = outputs(run_dir), outputs(reference)
        assert ours.keys() == ref.keys()
        assert [k for k in ref if ours[k] != ref[k]] == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _plan_with_code(reference: Path, tmp_path: Path, monkeypatch, edit) -> dict[str, tuple[str, str]]:
    """The plan of a copy of the reference run when the project's source is a copy with
    `edit(root)` applied: {stage: (action, reason)}."""
    from qlora_pipeline import codehash
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.runner import Runner
    from qlora_pipeline.stages import build_stages

    src = tmp_path / "src"
    for package in codehash.PACKAGE_FOLDERS.values():
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    edit(src)
    monkeypatch.setattr(codehash, "ROOT", src)
    monkeypatch.setattr(codehash, "package_dir", lambda top: src / codehash.PACKAGE_FOLDERS[top])
    run_dir = tmp_path / "runs" / reference.name  # the same name: a renamed copy re-runs its report
    shutil.copytree(reference, run_dir, symlinks=True)
    recipe, _ = load_recipe(reference.parent.parent / "ref.yaml")
    planned = Runner(run_dir, build_stages(recipe)).plan()
    return {p.spec.name: (p.action, p.reason) for p in planned}


def test_a_code_change_in_gptq_reruns_exactly_the_stages_that_run_it(reference, tmp_path, monkeypatch):
    def change(root: Path) -> None:
        path = root / "quant" / "gptq.py"
        path.write_text(path.read_text() + "\n\nUNUSED_BUT_NEW_CODE = 1\n")

    plan = _plan_with_code(reference, tmp_path, monkeypatch, change)
    for stage in ("data", "base", "train", "merge", "calibrate", "evaluate-base", "evaluate-base-nf4", "evaluate-merged"):
        assert plan[stage] == ("skip", "up to date"), (stage, plan[stage])
    for stage in ("quantize-rtn", "quantize-gptq", "quantize-awq"):  # all three run quant/gptq.py
        assert plan[stage] == ("run", "code changed: quant/gptq.py"), (stage, plan[stage])
    for stage in ("evaluate-rtn", "evaluate-gptq", "evaluate-awq", "report"):
        assert plan[stage][0] == "run" and plan[stage][1].startswith("after "), (stage, plan[stage])


def test_comments_docstrings_and_formatting_are_not_code(reference, tmp_path, monkeypatch):
    def restyle(root: Path) -> None:
        path = root / "quant" / "gptq.py"
        text = path.read_text()
        assert text.startswith('"""')
        text = '"""A reworded module docstring, ' + text[3:]  # docstrings are not code
        text = "# a new comment\n" + text.replace("\n\n\n", "\n\n\n\n", 3)  # nor comments or blank lines
        path.write_text(text.replace("(", "( ", 5))  # nor spacing

    plan = _plan_with_code(reference, tmp_path, monkeypatch, restyle)
    assert {action for action, _ in plan.values()} == {"skip"}, plan
