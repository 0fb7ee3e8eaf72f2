"""The stage cache shared by run directories: a finished stage's output is reused wherever its
fingerprint comes up again, verified first, never half-written, and never at the cost of a run.

Toy stages for the runner's logic, the tiny random Llama for the pipeline itself."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipeline import rundir, stagecache
from qlora_pipeline.graph import StageResult, StageSpec
from qlora_pipeline.models import cache_root
from qlora_pipeline.recipe import CacheConfig
from qlora_pipeline.runner import Runner
from qlora_pipeline.stagecache import ENTRY, ENV, StageCache, open_cache, short_key, user_cache_dir
from tests.conftest import REPO, cli, tiny_recipe
from tests.pipeline.test_runner import Toy, small_disk  # noqa: F401  (a fixture)


def in_dir(toy: Toy, run_dir: Path, cache: StageCache | None, **values) -> Runner:
    """The toy's stages in `run_dir`, with `cache`."""
    return Runner(run_dir, toy.runner(**values).specs, cache=cache)


def entries(cache: StageCache) -> dict[str, dict]:
    """{stage: entry.json} of every entry in the cache."""
    records = [json.loads(p.read_text()) for p in cache.root.glob(f"*/{ENTRY}")]
    return {r["stage"]: r for r in records}


def flip_a_byte(path: Path) -> None:
    """Replace `path` by a copy with one byte flipped, same size and mtime (a new inode: the
    run directories hard-linked to the old one keep their bytes)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


@pytest.fixture
def toy(tmp_path):
    return Toy(tmp_path)


@pytest.fixture
def cache(tmp_path):
    return StageCache(tmp_path / "cache")


def test_a_second_run_directory_takes_finished_stages_from_the_cache(toy, cache, tmp_path):
    in_dir(toy, tmp_path / "one", cache).run()
    assert set(entries(cache)) == {"a", "b", "c"}
    toy.calls.clear()
    two = tmp_path / "two"
    planned = in_dir(toy, two, cache, c=2).plan()
    assert [(p.spec.name, p.action) for p in planned] == [("a", "cache"), ("b", "cache"), ("c", "run")]
    key = planned[0].fingerprint
    assert planned[0].reason == f"from cache: {short_key(key)} (not run yet)"
    done = in_dir(toy, two, cache, c=2).run()
    assert toy.calls == ["c"]  # a and b did not execute
    assert [p.outcome for p in done] == ["cached", "cached", "ran"]
    for stage, name in (("a", "a.txt"), ("b", "b.txt")):
        ours, theirs = two / stage / "output" / name, tmp_path / "one" / stage / "output" / name
        assert ours.read_bytes() == theirs.read_bytes()
        assert ours.stat().st_ino == theirs.stat().st_ino  # hard links on one filesystem
    manifest = json.loads((two / "a" / "manifest.json").read_text())
    original = json.loads((tmp_path / "one" / "a" / "manifest.json").read_text())
    assert manifest["cache"]["key"] == key == original["fingerprint"]
    assert manifest["files"] == original["files"] and manifest["metrics"] == original["metrics"]
    assert "stage_seconds" in manifest["metrics"]  # what evaluation reads of a quantize stage
    assert (two / "c" / "output" / "c.txt").read_text() == "a=1 b=1 c"
    # Afterwards the run directory is up to date, and says where its outputs came from.
    again = in_dir(toy, two, cache, c=2).plan()
    assert [p.action for p in again] == ["skip"] * 3
    assert again[0].reason == f"up to date (from cache {short_key(key)})" and again[2].reason == "up to date"


def test_a_stage_waiting_on_a_running_one_checks_the_cache_when_its_inputs_are_known(toy, cache, tmp_path):
    in_dir(toy, tmp_path / "one", cache).run()
    shutil.rmtree(cache.root / entries(cache)["a"]["fingerprint"])  # a must run again
    toy.calls.clear()
    runner = in_dir(toy, tmp_path / "two", cache)
    planned = runner.plan()
    assert [p.action for p in planned] == ["run", "run", "run"]
    assert planned[1].fingerprint is None and planned[1].waits_on == ("a",)  # known once a has run
    done = runner.run()
    assert toy.calls == ["a"]  # a reproduced its bytes: b's fingerprint, then c's, are in the cache
    assert [p.outcome for p in done] == ["ran", "cached", "cached"]
    assert done[1].reason.startswith("from cache: ")


def test_a_damaged_entry_is_not_used_and_a_good_one_replaces_it(toy, cache, tmp_path, caplog):
    in_dir(toy, tmp_path / "one", cache).run()
    bad = entries(cache)["b"]
    flip_a_byte(cache.root / bad["fingerprint"] / "output" / "b.txt")
    toy.calls.clear()
    caplog.set_level("INFO")
    done = in_dir(toy, tmp_path / "two", cache).run()
    assert toy.calls == ["b"]  # the entry failed its hash check: b ran, a and c came from the cache
    assert [p.outcome for p in done] == ["cached", "ran", "cached"]
    assert f"stage cache: entry {short_key(bad['fingerprint'])} is damaged" in caplog.text
    assert (tmp_path / "two" / "b" / "output" / "b.txt").read_text() == "a=1 b=1"
    good = cache.find(bad["fingerprint"], full=True, discard=False)  # the new result, stored in its place
    assert good is not None and good.record["source"] == str((tmp_path / "two" / "b").resolve())
    assert not list(cache.root.glob(".tmp-*"))
    toy.calls.clear()
    assert [p.outcome for p in in_dir(toy, tmp_path / "three", cache).run()] == ["cached"] * 3
    assert toy.calls == []


MALFORMED = {  # entry.json edits that leave a record which does not say what to verify, or where
    "not its key": lambda r: {**r, "fingerprint": "0" * 20},
    "a file without its size": lambda r: {**r, "files": {"a.txt": {"sha256": r["files"]["a.txt"]["sha256"]}}},
    "a file row that is not a row": lambda r: {**r, "files": {"a.txt": "a"}},
    # the same file, named through its parent: it verifies, but would be placed beside output.partial/
    "a path out of the output": lambda r: {**r, "files": {"../output/a.txt": r["files"]["a.txt"]}},
    "metrics that are not numbers": lambda r: {**r, "metrics": {"value": "one"}},
}


@pytest.mark.parametrize("damage", ["truncated", "no record", *MALFORMED])
def test_an_entry_that_does_not_verify_by_size_or_record_is_not_even_planned(toy, cache, tmp_path, damage):
    in_dir(toy, tmp_path / "one", cache).run()
    entry = cache.root / entries(cache)["a"]["fingerprint"]
    if damage == "truncated":
        (entry / "output" / "a.txt").chmod(0o644)  # entries are read-only; this damage gets past that
        (entry / "output" / "a.txt").write_text("a")
    elif damage == "no record":
        (entry / ENTRY).unlink()
    else:
        (entry / ENTRY).write_text(json.dumps(MALFORMED[damage](json.loads((entry / ENTRY).read_text()))))
    assert in_dir(toy, tmp_path / "two", cache).plan()[0].action == "run"
    assert entry.exists()  # plan writes nothing
    toy.calls.clear()
    in_dir(toy, tmp_path / "two", cache).run()
    assert toy.calls[0] == "a"
    assert cache.find(entries(cache)["a"]["fingerprint"], full=True, discard=False) is not None


def test_a_stage_planned_from_the_cache_has_its_inputs_checked_in_case_it_runs(toy, cache, tmp_path):
    """b's entry passes plan's size check but not run's hash check, so b runs after all: on a's
    output as its manifest says it is, not as someone altered it (same size and mtime)."""
    one = tmp_path / "one"
    in_dir(toy, one, cache).run()
    (one / "b" / "manifest.json").unlink()  # b is due again
    flip_a_byte(one / "a" / "output" / "a.txt")  # a new inode: the entry of a keeps its bytes
    flip_a_byte(cache.root / entries(cache)["b"]["fingerprint"] / "output" / "b.txt")
    toy.calls.clear()
    done = in_dir(toy, one, cache).run()
    assert [p.outcome for p in done] == ["cached", "ran", "skipped"]  # a rebuilt (from its entry) before b read it
    assert toy.calls == ["b"]
    assert (one / "b" / "output" / "b.txt").read_text() == "a=1 b=1"


def test_an_entry_that_cannot_be_read_is_not_used_and_nothing_crashes(toy, cache, tmp_path, monkeypatch):
    in_dir(toy, tmp_path / "one", cache).run()
    real = rundir.verify_files

    def unreadable(root, files, **kwargs):  # what a cache folder of another user gives
        if cache.root in Path(root).parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(root))
        return real(root, files, **kwargs)

    monkeypatch.setattr(rundir, "verify_files", unreadable)
    toy.calls.clear()
    assert [p.action for p in in_dir(toy, tmp_path / "two", cache).plan()] == ["run"] * 3
    assert [p.outcome for p in in_dir(toy, tmp_path / "two", cache).run()] == ["ran"] * 3
    assert toy.calls == ["a", "b", "c"]


def test_entries_and_the_outputs_they_share_an_inode_with_are_read_only(toy, cache, tmp_path):
    """A hard link makes a run's published file and the entry one file: an in-place write into
    either (an editor that keeps hard links) must fail, not alter the other."""
    in_dir(toy, tmp_path / "one", cache).run()
    in_dir(toy, tmp_path / "two", cache, c=2).run()
    shared = [*cache.root.glob("*/output/*"), *(tmp_path / "one").glob("*/output/*"),
              *(tmp_path / "two").glob("*/output/*")]
    assert len(shared) == 4 + 3 + 3  # a, b, c and the new c; the outputs of both runs
    for path in shared:
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path


def test_an_in_place_write_into_a_run_output_fails_and_leaves_the_entry_alone(toy, cache, tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0o444)
    if os.access(probe, os.W_OK):
        pytest.skip("file modes bind no one here (root, or CAP_DAC_OVERRIDE)")
    in_dir(toy, tmp_path / "one", cache).run()
    with pytest.raises(PermissionError):
        open(tmp_path / "one" / "a" / "output" / "a.txt", "r+b")
    assert cache.find(entries(cache)["a"]["fingerprint"], full=True, discard=False) is not None


def test_forced_stages_run_even_with_an_entry(toy, cache, tmp_path):
    in_dir(toy, tmp_path / "one", cache).run()
    toy.calls.clear()
    done = in_dir(toy, tmp_path / "one", cache).run(force=True)
    assert toy.calls == ["a", "b", "c"] and {p.outcome for p in done} == {"ran"}


def test_a_stage_that_is_not_cacheable_is_neither_stored_nor_restored(toy, cache, tmp_path):
    def runner(run_dir):
        specs = toy.runner().specs
        specs[2] = StageSpec("c", toy.c, ("b",), {"value": 1}, cacheable=False)
        return Runner(run_dir, specs, cache=cache)

    runner(tmp_path / "one").run()
    assert set(entries(cache)) == {"a", "b"}
    toy.calls.clear()
    assert [p.action for p in runner(tmp_path / "two").plan()] == ["cache", "cache", "run"]
    assert [p.outcome for p in runner(tmp_path / "two").run()] == ["cached", "cached", "ran"]
    assert toy.calls == ["c"]


def test_without_a_cache_nothing_is_read_or_written(toy, cache, tmp_path):
    in_dir(toy, tmp_path / "one", cache).run()
    before = sorted((p.relative_to(cache.root), p.stat().st_mtime_ns) for p in cache.root.rglob("*"))
    toy.calls.clear()
    runner = in_dir(toy, tmp_path / "two", None)
    assert [p.action for p in runner.plan()] == ["run"] * 3
    runner.run()
    assert toy.calls == ["a", "b", "c"]
    assert sorted((p.relative_to(cache.root), p.stat().st_mtime_ns) for p in cache.root.rglob("*")) == before


def test_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("QLP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert open_cache(CacheConfig()).root == tmp_path / "xdg" / "qlora-pipeline" / "stages"
    assert cache_root() == tmp_path / "xdg" / "qlora-pipeline"  # the converted models' folder too
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert user_cache_dir() == Path.home() / ".cache" / "qlora-pipeline" / "stages"
    monkeypatch.setenv("QLP_CACHE", str(tmp_path / "project"))  # moves the models and the stage cache alike
    assert user_cache_dir() == tmp_path / "project" / "stages" and cache_root() == tmp_path / "project"
    assert open_cache(CacheConfig(dir=str(tmp_path / "mine"))).root == tmp_path / "mine"
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert open_cache(CacheConfig(dir=str(tmp_path / "mine"))).root == tmp_path / "env"
    assert open_cache(CacheConfig(enabled=False, dir=str(tmp_path / "mine"))) is None


def test_a_cache_that_cannot_be_written_does_not_fail_the_stage(toy, cache, tmp_path, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stagecache, "place_files", full)
    caplog.set_level("INFO")
    done = in_dir(toy, tmp_path / "one", cache).run()
    assert [p.outcome for p in done] == ["ran"] * 3
    assert all((tmp_path / "one" / s / "manifest.json").is_file() for s in "abc")
    assert "stage cache: could not store a" in caplog.text and "No space left on device" in caplog.text
    assert list(cache.root.glob("*")) == []  # nothing half-written


def test_a_full_cache_disk_keeps_what_fits_and_copies_across_filesystems(small_disk, tmp_path, caplog):  # noqa: F811
    """The cache on a 1 MiB tmpfs, the run directories elsewhere: entries are copies; the
    second stage's 600 kB do not fit next to the first's."""
    def a(ctx):
        (ctx.output_dir / "a.bin").write_bytes(b"a" * 600_000)
        return StageResult()

    def b(ctx):
        (ctx.output_dir / "b.bin").write_bytes((ctx.inputs["a"] / "a.bin").read_bytes().replace(b"a", b"b"))
        return StageResult()

    specs = [StageSpec("a", a, (), {}), StageSpec("b", b, ("a",), {})]
    cache = StageCache(small_disk / "cache")
    caplog.set_level("INFO")
    Runner(tmp_path / "one", specs, cache=cache).run()
    assert "stage cache: could not store b" in caplog.text
    assert set(entries(cache)) == {"a"} and not list(cache.root.glob(".tmp-*"))
    done = Runner(tmp_path / "two", specs, cache=cache).run()
    assert [p.outcome for p in done] == ["cached", "ran"]
    restored, original = tmp_path / "two" / "a" / "output" / "a.bin", tmp_path / "one" / "a" / "output" / "a.bin"
    assert restored.read_bytes() == original.read_bytes() and restored.stat().st_ino != original.stat().st_ino


DISTRIBUTED = '''
import os, sys
from pathlib import Path
from qlora_pipeline.graph import StageResult, StageSpec
from qlora_pipeline.runner import Runner
from qlora_pipeline.stagecache import StageCache

tmp, rank = Path(sys.argv[1]), os.environ["RANK"]

def note(what):
    with open(tmp / f"rank{rank}.log", "a") as f:
        f.write(what + "\\n")

store = StageCache.store
StageCache.store = lambda self, key, output, record: (note("store " + record["stage"]), store(self, key, output, record))

def data(ctx):
    note("data")
    (ctx.output_dir / "d.txt").write_text("d")
    return StageResult()

def train(ctx):  # every rank runs it; rank 0 writes the output
    note("train")
    if rank == "0":
        (ctx.output_dir / "t.txt").write_text((ctx.inputs["data"] / "d.txt").read_text() + "t")
    return StageResult()

if len(sys.argv) > 2 and rank == "1":  # rank 1 lags after every synchronisation point
    import time
    from qlora_pipeline.runner import Ranks
    barrier = Ranks.barrier
    Ranks.barrier = lambda self: (barrier(self), time.sleep(float(sys.argv[2])))

specs = [StageSpec("data", data, (), {}), StageSpec("train", train, ("data",), {}, distributed=True)]
for name in ("one", "two"):
    note("run " + name)
    Runner(tmp / name, specs, cache=StageCache(tmp / "cache")).run()
'''


@pytest.mark.parametrize("lag", [None, "0.5"], ids=["in-step", "rank-1-lagging"])
def test_two_processes_only_rank_0_stores_and_no_rank_reruns_a_cached_distributed_stage(tmp_path, lag):
    """Every rank follows the main process's decisions: a rank that reaches a stage late (here
    0.5 s after each synchronisation point, by which time the main process has restored
    `train` from the cache and marked it done) neither decides differently nor drops out of
    step (it used to skip the stage's barriers and leave the main process waiting on a closed
    connection)."""
    script = tmp_path / "ranks.py"
    script.write_text(DISTRIBUTED)
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    proc = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script), str(tmp_path), *([lag] if lag else [])],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.log").read_text().split("\n") == \
        ["run one", "data", "store data", "train", "store train", "run two", ""]
    assert (tmp_path / "rank1.log").read_text().split("\n") == ["run one", "train", "run two", ""]
    assert (tmp_path / "two" / "train" / "output" / "t.txt").read_text() == "dt"
    assert json.loads((tmp_path / "two" / "train" / "manifest.json").read_text())["cache"]["key"]


# ----------------------------------------------------------------------------- the pipeline


FAST = {"evaluate": {"max_domain_windows": 2, "max_general_windows": 2, "batch_size": 4, "speed": False, "prompts": []},
        "train": {"steps": 2, "save_interval": 2, "eval_interval": 2}}
REUSED = ("data", "base", "evaluate-base", "evaluate-base-nf4")
REDONE = ("train", "merge", "evaluate-merged", "report")


def cached_recipe(model_dir: Path, tmp_path: Path, **run) -> Path:
    recipe = tiny_recipe(model_dir, tmp_path, tracking={"enabled": False}, run={"cache": {"enabled": True}, **run},
                         **FAST)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def outputs(run_dir: Path, stage: str) -> dict[str, bytes]:
    root = run_dir / stage / "output"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_changing_train_steps_reuses_everything_before_training(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    recipe = str(cached_recipe(tiny_llama_dir, tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("run", recipe, "--run-dir", str(one)) == 0
    capsys.readouterr()

    assert cli("plan", recipe, "--run-dir", str(two), "--set", "train.steps=3") == 0
    out = capsys.readouterr().out
    assert f"stage cache: {tmp_path / 'cache'}" in out
    plan = {line.split()[0]: line.split(None, 3)[1:] for line in out.splitlines() if line.startswith("  ")}
    for stage in REUSED:
        action, status, reason = plan[stage]
        assert (action, status) == ("cache", "missing") and reason.startswith("from cache: "), (stage, plan[stage])
    assert plan["train"][0] == "run" and plan["train"][2] == "not run yet"
    assert all(plan[s][0] == "run" for s in REDONE)

    assert cli("run", recipe, "--run-dir", str(two), "--set", "train.steps=3") == 0
    header, *lines = capsys.readouterr().out.split("stage summary")[1].splitlines()[1:-1]
    assert header.split()[:5] == ["stage", "outcome", "seconds", "peak", "RSS"]
    summary = {line.split()[0]: line.split()[1] for line in lines}
    assert summary == {**{s: "cached" for s in REUSED}, **{s: "ran" for s in REDONE}}
    # The process's peak RSS once each stage ran: a high-water mark, so never falling down the list
    peaks = [float(line.split()[4]) for line in lines if line.split()[1] == "ran"]
    assert len(peaks) == len(REDONE) and peaks[0] > 0.1 and peaks == sorted(peaks)
    assert all(line.split()[5] == "GiB" for line in lines if line.split()[1] == "ran")
    assert all("GiB" not in line for line in lines if line.split()[1] == "cached")
    for stage in REUSED:
        manifest = json.loads((two / stage / "manifest.json").read_text())
        assert manifest["cache"]["source"] == str((one / stage).resolve())
        assert outputs(two, stage) == outputs(one, stage)
        first = next((one / stage / "output").rglob("*.*"))  # the same inode: nothing was executed
        assert (two / stage / "output" / first.relative_to(one / stage / "output")).stat().st_ino == first.stat().st_ino
    for stage in REDONE:
        assert "cache" not in json.loads((two / stage / "manifest.json").read_text())
    assert outputs(two, "train") != outputs(one, "train")
    assert (two / "report" / "output" / "report.md").read_text().startswith("# Report: two")

    assert cli("status", str(two)) == 0
    status = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()}
    assert status["data"][0] == "done" and status["data"][1].startswith("up to date (from cache ")
    assert status["train"] == ["done", "up to date"]


def test_a_disabled_cache_is_neither_read_nor_written(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    recipe = str(cached_recipe(tiny_llama_dir, tmp_path))
    assert cli("run", recipe, "--run-dir", str(tmp_path / "one"), "--only", "data") == 0
    cache = StageCache(tmp_path / "cache")
    assert set(entries(cache)) == {"data"}
    before = sorted((p, p.stat().st_mtime_ns) for p in cache.root.rglob("*"))
    capsys.readouterr()
    off = ("--set", "run.cache.enabled=false")
    assert cli("plan", recipe, "--run-dir", str(tmp_path / "two"), *off) == 0
    out = capsys.readouterr().out
    assert "stage cache: off" in out
    assert "cache" not in "".join(line for line in out.splitlines() if line.startswith("  "))
    assert cli("run", recipe, "--run-dir", str(tmp_path / "two"), "--only", "data", *off) == 0
    assert "cache" not in json.loads((tmp_path / "two" / "data" / "manifest.json").read_text())
    assert sorted((p, p.stat().st_mtime_ns) for p in cache.root.rglob("*")) == before


def test_a_cache_folder_that_cannot_be_written_stops_the_run_before_it_starts(tiny_llama_dir, tmp_path, monkeypatch,
                                                                              capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(ENV, str(tmp_path / "a-file" / "cache"))  # not a folder, even for root
    recipe = str(cached_recipe(tiny_llama_dir, tmp_path))
    assert cli("run", recipe, "--run-dir", str(tmp_path / "one"), "--only", "data") == 2
    err = capsys.readouterr().err
    assert f"error: stage cache {tmp_path / 'a-file' / 'cache'}: cannot write there" in err
    assert "run.cache.enabled=false" in err and "Traceback" not in err
    assert not (tmp_path / "one").exists()
    assert cli("plan", recipe, "--run-dir", str(tmp_path / "one")) == 0  # plan writes nothing: it only reads


def test_only_stages_kept_out_of_the_cache_read_their_run_directory():
    """An entry is used in any run directory: a stage whose output depends on its own run
    directory (`ctx.run_dir`) must not be cacheable; its fingerprint holds the directory's
    name (`StageSpec.names_run_dir`), so a copied or renamed run directory re-runs it."""
    import ast

    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    stages = REPO / "pipeline" / "stages"
    readers = {f"qlora_pipeline.stages.{p.stem}" for p in stages.glob("*.py")
               if any(isinstance(n, ast.Attribute) and n.attr == "run_dir" for n in ast.walk(ast.parse(p.read_text())))}
    assert readers == {"qlora_pipeline.stages.report"}
    specs = build_stages(load_recipe(REPO / "recipes" / "smollm2_domain.yaml")[0])
    assert [s.name for s in specs if s.module in readers] == ["report"]
    assert [s.name for s in specs if not s.cacheable] == ["report"]
    assert [s.name for s in specs if s.names_run_dir] == ["report"]  # its settings name the run directory


def test_a_stage_whose_entry_never_reached_the_cache_is_stored_when_found_up_to_date(toy, cache, tmp_path):
    """A kill between publishing a stage and storing it (here: the entries deleted afterwards)
    left the stage done in its run directory and never offered to the cache again: every new
    run directory recomputed it."""
    one = tmp_path / "one"
    in_dir(toy, one, cache).run()
    stored = entries(cache)
    for record in stored.values():
        shutil.rmtree(cache.root / record["fingerprint"])
    toy.calls.clear()
    assert [p.outcome for p in in_dir(toy, one, cache).run()] == ["skipped"] * 3
    assert toy.calls == [] and set(entries(cache)) == {"a", "b", "c"}
    for stage, record in entries(cache).items():
        assert record["fingerprint"] == stored[stage]["fingerprint"]
        assert {k: v["sha256"] for k, v in record["files"].items()} == \
            {k: v["sha256"] for k, v in stored[stage]["files"].items()}
        assert record["metrics"] == stored[stage]["metrics"]
    done = in_dir(toy, tmp_path / "two", cache).run()
    assert toy.calls == [] and [p.outcome for p in done] == ["cached"] * 3
    # Bytes altered in the run directory after the stage published them are stored with the
    # manifest's hashes, so the entry fails verification and a new run directory recomputes.
    shutil.rmtree(cache.root / entries(cache)["a"]["fingerprint"])
    flip_a_byte(one / "a" / "output" / "a.txt")
    runner = Runner(one, toy.runner().specs, cache=cache, verify_inputs=False)  # a skip hashes nothing
    runner.run(only="a")
    toy.calls.clear()
    assert [p.outcome for p in in_dir(toy, tmp_path / "three", cache).run()][0] == "ran"
    assert toy.calls[0] == "a"
