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

from tests.conftest import REPO, tiny_recipe

QUANTIZE = [
    {"name": "rtn", "method": "rtn", "bits": 4, "group_size": 32},
    {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 32, "desc_act": True},
    {"name": "awq", "method": "awq", "bits": 4, "group_size": 32, "awq": {"search_windows": 2}},
]
# Measurements, not results: they differ from run to run by nature.
TIMING_KEYS = {"load_seconds", "peak_memory_bytes", "quantize_seconds", "prefill_tokens_per_second",
               "decode_tokens_per_second"}


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
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed or str(random.randrange(1 << 30))}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(recipe), *extra], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(run_dir: Path) -> dict[str, object]:
    """Every output file of every stage: its sha256, or for the files that hold measurements
    (evaluations, report) the computed values without the timings."""
    out: dict[str, object] = {}
    for path in sorted(run_dir.glob("*/output/**/*")):
        if not path.is_file():
            continue
        rel = path.relative_to(run_dir).as_posix()
        stage = rel.split("/", 1)[0]
        if stage == "report":
            if path.name == "metrics.json":
                artifacts = json.loads(path.read_text())["artifacts"]
                out[rel] = {a: {k: v for k, v in m.items() if k not in TIMING_KEYS} for a, m in artifacts.items()}
            continue  # the report's text and plots show the timings
        if stage.startswith("evaluate-") and path.name == "metrics.json":
            out[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}
        else:
            out[rel] = sha256(path)
    return out


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
    for target in ("base", "train", "merge", "quantize-gptq", "quantize-awq", "evaluate-merged", "report"):
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


STAGE_FILES = {  # one output file of each stage kind, and what must run after altering it
    "data": ("tokens.safetensors", {"data"}),
    "base": ("model.safetensors", {"base"}),
    "train": ("adapter_model.safetensors", {"train"}),
    "merge": ("model.safetensors", {"merge"}),
    "calibrate": ("calibration.safetensors", {"calibrate"}),
    "quantize-gptq": ("model.safetensors", {"quantize-gptq"}),
    # An evaluation measures timings again, so the report that shows them is rebuilt too.
    "evaluate-awq": ("metrics.json", {"evaluate-awq", "report"}),
    "report": ("report.md", {"report"}),
}


def test_an_altered_output_file_rebuilds_exactly_its_stage(reference, tmp_path):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir, symlinks=True)
    recipe_path = tmp_path / "ref.yaml"
    recipe = yaml.safe_load((reference.parent.parent / "ref.yaml").read_text())
    recipe["run"]["dir"] = str(tmp_path / "runs")
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for stage, (name, expected) in STAGE_FILES.items():
        target = run_dir / stage / "output" / name
        assert target.is_file(), target
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
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir, symlinks=True)
    recipe = yaml.safe_load((reference.parent.parent / "ref.yaml").read_text())
    recipe["run"]["dir"] = str(tmp_path / "runs")
    recipe_path = tmp_path / "ref.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    target = run_dir / "merge" / "output" / "model.safetensors"
    good = target.read_bytes()
    st = target.stat()
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    target.write_bytes(bytes(bad))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: size and mtime as recorded
    # --only cannot rebuild the merge: it refuses, naming the file, and computes nothing.
    proc = start(recipe_path, tmp_path, "--only", "quantize-rtn", "--force")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "merge/output/model.safetensors" in err, err
    assert "Traceback" not in err
    # A run that re-quantizes rebuilds the merge first, then quantizes the good bytes.
    before = manifest_times(run_dir)
    err = finish(start(recipe_path, tmp_path, "--from", "quantize-rtn"))
    after = manifest_times(run_dir)
    assert {"merge", "quantize-rtn"} <= {s for s in after if after[s] != before[s]}
    assert target.read_bytes() == good
    assert sha256(run_dir / "quantize-rtn" / "output" / "model.safetensors") == \
        sha256(reference / "quantize-rtn" / "output" / "model.safetensors")


class _Payload:
    """Unpickling this creates a marker file: proof that the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_trainer_pickle_is_never_executed(reference, tmp_path):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir, symlinks=True)
    recipe = yaml.safe_load((reference.parent.parent / "ref.yaml").read_text())
    recipe["run"]["dir"] = str(tmp_path / "runs")
    recipe_path = tmp_path / "ref.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
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
    for folder in ("pipeline", "quant", "kernels", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if PICKLE_LOADS.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, offenders
