"""`pipeline`: run a recipe's stages, show what would run, inspect a run, open the MLflow UI.

Exit codes: 0 success, 1 a stage failed, 2 bad input (recipe, paths, data, a busy run dir).
"""
from __future__ import annotations

import errno
import importlib
import json
import logging
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click

from qlora_pipeline.errors import InputError, StageError

logger = logging.getLogger("qlora_pipeline")  # the parent of every module logger (__name__)

EPILOG = """\b
Examples:
  pipeline validate recipes/smollm2_domain.yaml
  pipeline plan recipes/smollm2_domain.yaml --set nf4.blocksize=128
  pipeline run recipes/smollm2_domain.yaml
  pipeline run recipes/smollm2_domain.yaml --from evaluate-base-nf4
  pipeline status runs/smollm2_domain
  pipeline memory path/to/Meta-Llama-3-70B --bits 4 --context 4096 32768 --batch 1 32
  pipeline ui
"""


def _setup_logging(verbose: bool) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not for users
    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:
        level = logging.WARNING  # one voice per launch: the main process reports
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "mlflow", "urllib3", "huggingface_hub", "alembic", "filelock", "accelerate",
                  # On AVX-512 BF16 CPUs bitsandbytes tries to fetch a CPU GEMM from the kernel hub
                  # (Hugging Face's `kernels` package, network) at import and warns when it cannot.
                  # Our NF4 runs on our own kernels; bitsandbytes is here for its optimizers.
                  "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # torch's own INFO lines are for its developers (an atexit "FakeTensor cache stats" printed
    # after a run stopped while a stage process imported torch); its warnings stay.
    logging.getLogger("torch").setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # transformers and huggingface_hub read these when first imported: quiet without importing
    # them here (commands like `validate` and `status` never do).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # huggingface_hub and datasets set their loggers' level from these when imported, over the
    # setLevel above, and print through a handler of their own as well as the root's: a hub
    # dataset that cannot be reached printed each of its 5 retries twice. Their own handler
    # alone prints now.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for library in ("huggingface_hub", "datasets"):
        logging.getLogger(library).propagate = False
        if library in sys.modules:  # imported already: the env above comes too late for it
            importlib.import_module(f"{library}.utils.logging").set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (in-process callers): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _load(recipe_path: str, sets: tuple[str, ...]):
    from qlora_pipeline.recipe import load_recipe

    return load_recipe(recipe_path, list(sets))


def _load_checked(recipe_path: str, sets: tuple[str, ...], convert_model: bool = False):
    """The validated recipe whose local inputs (model, adapter, data files) passed preflight.

    Runs before any Runner or Tracker exists: bad input leaves no run directory, lock or
    MLflow run behind. `convert_model` (for `run`): a built-in or GGUF model not converted
    yet is converted first, so that the checks against its config (LoRA targets, group
    sizes, context, an adapter's shapes) run before the first stage, not when a stage
    minutes later meets the problem.
    """
    from qlora_pipeline.errors import RecipeError
    from qlora_pipeline.preflight import cache_places, outputs_inside_data, preflight
    from qlora_pipeline.stages import build_stages

    cfg, raw = _load(recipe_path, sets)
    problems = outputs_inside_data(cfg, cache_places(cfg))  # before a cache is written (a model's hashes)
    if problems:
        raise RecipeError(problems, source=recipe_path)
    if convert_model:
        _convert_local_model(cfg)
    preflight(cfg, source=recipe_path, hub_snapshot=not convert_model)  # `run` checks it after the download
    try:
        build_stages(cfg)  # its checks against the model's config (group sizes, context), torch-free
    except RecipeError as exc:  # named after the recipe file, as every other recipe problem
        raise RecipeError(exc.problems, source=recipe_path) from None
    return cfg, raw


def _convert_local_model(recipe) -> None:
    """Convert the recipe's built-in or GGUF model once (cached) when it is readable; a source
    that is not is left to preflight, which names what is wrong with it."""
    from qlora_pipeline.models import is_local_gguf_source, resolve_model
    from qlora_pipeline.preflight import check_model_source

    if is_local_gguf_source(recipe.model) and not check_model_source(recipe.model.source):
        resolve_model(recipe.model)  # returns the cached conversion at once when there is one


def _unchecked_model_note(recipe) -> Optional[str]:
    """For `validate`/`plan`: the checks that need the model's config.json and could not run
    because the model is not on disk yet (a built-in or GGUF model not converted, a hub model
    not downloaded); `run` makes it local and checks before its first stage."""
    from qlora_pipeline.models import cached_config, is_hub_source

    try:
        if cached_config(recipe.model) is not None:
            return None
    except InputError:
        return None  # reported by preflight
    made = "downloaded" if is_hub_source(recipe.model) else "converted"
    return (f"not checked yet: {recipe.model.source} is not {made} yet, so lora.target_modules, the quantize "
            f"entries' group sizes, the windows against the model's context and merge.adapter are checked when "
            f"`pipeline run` has {made} it, before its first stage")


def _runner(recipe, run_dir: Optional[str], for_run: bool, recipe_name: Optional[str] = None,
            from_stage: Optional[str] = None, only: Optional[str] = None, source: str = "recipe"):
    """The Runner of `recipe` in its run directory, for `run` (`for_run`: it may write there,
    fetches what hub sources stand for now, and tracks) or for `plan` (reads only); `source`
    names the recipe file in the errors of its settings."""
    from qlora_pipeline import rundir
    from qlora_pipeline.data_identity import resolve_hub_dataset
    from qlora_pipeline.errors import RecipeError
    from qlora_pipeline.models import cached_hub_snapshot, is_hub_source, resolve_model
    from qlora_pipeline.preflight import check_model_dir, outputs_inside_data
    from qlora_pipeline.recipe import flatten
    from qlora_pipeline.runinfo import check_records
    from qlora_pipeline.runner import Runner, selection_problem
    from qlora_pipeline.stagecache import open_cache
    from qlora_pipeline.stages import build_stages

    # `~` as the shell would: unexpanded, a run.dir of ~/runs made a folder named '~' here.
    if run_dir is not None and not run_dir.strip():  # `--run-dir=` (an unset shell variable): not the default
        raise InputError("--run-dir is empty; give the run directory's path, or leave --run-dir out for the "
                         "recipe's run.dir/run.name")
    directory = Path(run_dir).expanduser() if run_dir else Path(recipe.run.dir).expanduser() / recipe.run.name
    problem = rundir.location_problem(directory, probe=for_run)  # only `run` may write
    if problem:
        raise InputError(f"run directory: {problem}; {rundir.RUN_DIR_HINT}")
    check_records(directory)  # before the tracker: a damaged run directory creates no MLflow run
    problems = outputs_inside_data(recipe, [("the run directory", directory, "--run-dir or run.dir")])
    if problems:
        raise RecipeError(problems, source=source)
    cache = open_cache(recipe.run.cache)
    specs = build_stages(recipe)
    problem = selection_problem([s.name for s in specs], from_stage, only)  # before the tracker makes a store
    if problem:
        raise InputError(problem)
    if for_run:  # what the hub's sources are now, then plan with their commits (`plan` reads the caches only)
        hub_data = [s for s in (recipe.data.domain, recipe.data.general) if s is not None and s.hub is not None]
        for hub_source in hub_data:
            resolve_hub_dataset(hub_source.hub, hub_source.revision)  # one small request; offline, the last run's answer
        hub_model = is_hub_source(recipe.model)
        if hub_model:
            snapshot = resolve_model(recipe.model)  # downloads into the hub cache, or finds it there
            if cached_hub_snapshot(recipe.model.source, recipe.model.revision) is None:
                # Offline, huggingface_hub hands back a snapshot a config or tokenizer lookup left.
                raise InputError(f"model.source: the local hub cache holds {recipe.model.source} only in part "
                                 f"({snapshot}: no config.json or not every weight file) and the hub could not "
                                 "complete it; run once with network access (HF_HUB_OFFLINE unset), or give a local "
                                 "model directory")
            # Checked now that it is complete: its files, and the recipe against its config.json
            # (windows, LoRA targets, group sizes; `build_stages`).
            problems = check_model_dir(snapshot, "model.source")
            if problems:
                raise RecipeError(problems, source=source)
        if hub_data or hub_model:
            try:
                specs = build_stages(recipe)
            except RecipeError as exc:
                raise RecipeError(exc.problems, source=source) from None
    if for_run and cache is not None:
        cache.check_writable()  # before the run directory or the tracking store is touched
    tracker = None
    is_main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch only rank 0 tracks
    if for_run and recipe.tracking.enabled and is_main:
        from qlora_pipeline.tracking import Tracker, parent_run_name, planned_artifact_folder

        # The report's artifacts quote the test split: they must not become training text.
        folder, existing = planned_artifact_folder(recipe.tracking.uri, recipe.tracking.experiment)
        fix = (f"the experiment '{recipe.tracking.experiment}' keeps the folder it was made with: set "
               "tracking.experiment to a new name, or delete that experiment" if existing else
               "start the run from another folder, or track to a server")
        problems = outputs_inside_data(recipe, [("MLflow's artifact folder", folder, fix)])
        if problems:
            raise RecipeError(problems, source=source)
        tracker = Tracker(recipe.tracking.uri, recipe.tracking.experiment,
                          parent_name=parent_run_name(recipe_name or recipe.run.name, directory))
    return Runner(directory, specs, tracker, recipe_dump=recipe.model_dump(mode="json"), params=flatten(recipe),
                  verify_inputs=recipe.run.verify_inputs, cache=cache)


@contextmanager
def _sigterm_stops_like_ctrl_c():
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt): without it a scheduler's
    time limit or `docker stop` killed the run as kill -9 does, leaving its lock, a stage
    recorded as running and the stage cache's temporary folder behind."""
    import signal

    from qlora_pipeline.errors import Terminated

    def stop(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding program's): its own handling stands
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _describe_parent_run(runner) -> None:
    """The parent run's description in MLflow: the report's headline table (after the report
    stage ran or was found up to date)."""
    tracker = runner.tracker
    if tracker is None or not tracker.enabled:
        return
    from qlora_pipeline.tracking import report_columns, report_note

    note = report_note(runner.run_dir)
    info = _read_json(runner.run_dir / "run.json")
    if note and info.get("mlflow_parent_run_id"):
        tracker.set_note(info["mlflow_parent_run_id"], note)
        tracker.show_columns(report_columns(runner.run_dir))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _print_summary(planned, seconds: float, report: Path) -> None:
    """The end of a run: per stage what happened and how long it took, the total, the report."""
    width = max(len(p.spec.name) for p in planned)
    click.echo("stage summary (peak RSS: this process's high-water mark once the stage had run):")
    # The last column is the plan's reason, which for a stage that ran says why it had to.
    click.echo(f"  {'stage':<{width}}  {'outcome':<8} {'seconds':>10}  {'peak RSS':>10}  why it ran / was skipped")
    for p in planned:
        took = f"{p.seconds:8.1f} s" if p.outcome in ("ran", "resumed", "cached") else " " * 10
        peak = f"{p.peak_rss_bytes / 2**30:6.2f} GiB" if p.peak_rss_bytes else " " * 10
        click.echo(f"  {p.spec.name:<{width}}  {p.outcome or 'skipped':<8} {took}  {peak}  {p.reason}")
    ran = sum(p.outcome in ("ran", "resumed") for p in planned)
    cached = sum(p.outcome == "cached" for p in planned)
    click.echo(f"{ran} stage(s) ran, {cached} from the stage cache, {len(planned) - ran - cached} skipped, "
               f"{seconds:.1f} s in all" + (f"; report: {report}" if report.is_file() else ""))


def _cache_place(runner) -> str:
    return str(runner.cache.root) if runner.cache else "off (run.cache.enabled: false)"


def _print_plan(planned) -> None:
    width = max(len(p.spec.name) for p in planned)
    for p in planned:
        click.echo(f"  {p.spec.name:<{width}}  {p.action:<5}  {p.status:<8}  {p.reason}")


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Fine-tune an LLM on your domain with QLoRA and ship it quantized, from one YAML recipe.

    Stages: data -> base (NF4) -> train (LoRA on the NF4 base) -> merge (bf16) -> calibrate ->
    awq-search-w<bits>g<group> (shared by AWQ and AWQ+GPTQ entries) -> quantize-<name> (GPTQ, AWQ, AWQ+GPTQ,
    round-to-nearest, ...) -> evaluate-<artifact> for every model along the way -> report. Each
    stage is checkpointed in the run directory (runs/<recipe name>/ by default) and tracked in
    MLflow; rerunning a command skips what is up to date and resumes what was interrupted.
    """
    _setup_logging(verbose)


_set_option = click.option("--set", "sets", multiple=True, metavar="KEY.PATH=VALUE",
                           help="Override a recipe key, e.g. --set nf4.blocksize=128 (repeatable).")
_run_dir_option = click.option("--run-dir", type=click.Path(file_okay=False), default=None,
                               help="Run directory (default: <run.dir>/<run.name>).")


@cli.command()
@click.argument("recipe", type=click.Path())
@_set_option
@_run_dir_option
@click.option("--from", "from_stage", metavar="STAGE", help="Re-run STAGE and everything downstream of it.")
@click.option("--only", metavar="STAGE", help="Run only STAGE (its upstream stages must be done).")
@click.option("--force", is_flag=True, help="Re-run every stage (with --only: just that one).")
def run(recipe: str, sets, run_dir, from_stage, only, force) -> None:
    """Run the recipe's stages; skip what is up to date, resume what was interrupted."""
    # From the first line to the last: a SIGTERM while the recipe is checked and the lock taken,
    # or after the stages, while the report and summary print, killed the run silently (-15).
    with _sigterm_stops_like_ctrl_c():
        _run(recipe, sets, run_dir, from_stage, only, force)


def _run(recipe: str, sets, run_dir, from_stage, only, force) -> None:
    from qlora_pipeline.errors import RecipeError
    from qlora_pipeline.preflight import run_problems

    cfg, _ = _load_checked(recipe, sets, convert_model=True)
    if run_problems(cfg):
        raise RecipeError(run_problems(cfg), source=recipe)
    runner = _runner(cfg, run_dir, for_run=True, recipe_name=Path(recipe).stem, from_stage=from_stage, only=only,
                     source=recipe)
    logger.info("run directory: %s", runner.run_dir)
    logger.info("stage cache: %s", _cache_place(runner))
    t0 = time.time()
    planned = runner.run(from_stage=from_stage, only=only, force=force)
    from qlora_pipeline.stages.report import REPORT_FILE, metrics_path

    report = metrics_path(runner.run_dir).with_name(REPORT_FILE)
    _describe_parent_run(runner)
    if int(os.environ.get("RANK", "0")) == 0:
        if report.is_file():
            click.echo(report.read_text())
        _print_summary(planned, time.time() - t0, report)
    if runner.tracker and runner.tracker.enabled:
        logger.info("tracking: %s (open it with `pipeline ui`)", runner.tracker.uri)
    from qlora_pipeline.stages.report import gate_close_calls_of, gate_failures

    for name, reasons in gate_failures(runner.run_dir, baselines=True).items():
        click.echo(f"quality gate: baseline {name} fails it, as a baseline may (not counted): {'; '.join(reasons)}",
                   err=True)
    for name, why in gate_close_calls_of(runner.run_dir).items():
        click.echo(f"quality gate: close call for {name}, {why} (the report says more)", err=True)
    failed = gate_failures(runner.run_dir)
    if failed:
        for name, reasons in failed.items():
            click.echo(f"quality gate failed: {name}: {'; '.join(reasons)}", err=True)
        raise StageError(f"{len(failed)} artifact(s) failed the quality gate (evaluate.gate); the other stages "
                         "finished. Loosen the threshold or change the quantizer settings.")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--markdown", "markdown", type=click.Path(), default=None, help="Also write the table as markdown to this file.")
@click.option("--metric", "metrics", multiple=True, metavar="KEY",
              help="A metrics.json key to show as a column, repeatable, e.g. --metric domain_ppl --metric "
              "load_seconds (default: perplexities, size, quantize time, peak memory, throughput).")
def compare(run_dirs, markdown, metrics) -> None:
    """One table of the artifacts of several runs (their report/output/metrics.json)."""
    from qlora_pipeline.compare import compare_runs, render

    seen: dict[Path, str] = {}
    for d in run_dirs:  # the same run twice gave each of its rows twice, as if two runs agreed
        where = Path(d).expanduser().resolve()
        if where in seen:
            raise InputError(f"{d}: the run directory {seen[where]} again; give each run once")
        seen[where] = d
    rows, columns = compare_runs([Path(d) for d in run_dirs], list(metrics) or None)
    if markdown:  # written first: a path that cannot be written is refused before any output
        try:
            Path(markdown).write_text(render(rows, columns, markdown=True) + "\n")
        except OSError as exc:
            raise InputError(f"--markdown {markdown}: cannot write it ({exc.strerror or exc}); give a file path "
                             "in a folder that exists and has space") from None
    click.echo(render(rows, columns, markdown=False))
    if markdown:
        click.echo(f"written: {markdown}")


@cli.command()
@click.argument("recipe", type=click.Path())
@_set_option
@_run_dir_option
@click.option("--from", "from_stage", metavar="STAGE", help="As `run --from`: show STAGE and everything downstream "
              "of it as re-run.")
@click.option("--only", metavar="STAGE", help="As `run --only`: show only STAGE.")
@click.option("--force", is_flag=True, help="As `run --force`: show every stage (with --only: that one) as re-run.")
def plan(recipe: str, sets, run_dir, from_stage, only, force) -> None:
    """Show the stage graph and, per stage, whether `run` would run or skip it, and why."""
    cfg, _ = _load_checked(recipe, sets)
    runner = _runner(cfg, run_dir, for_run=False, source=recipe)
    note = _unchecked_model_note(cfg)
    if note:
        click.echo(note)
    click.echo(f"run directory: {runner.run_dir}")
    click.echo(f"stage cache: {_cache_place(runner)}")
    _print_plan(runner.plan(from_stage, only, force))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-hash every output file against its manifest.")
def status(run_dir: str, verify: bool) -> None:
    """Per stage of RUN_DIR: done, partial (resume point), failed (error), stale or pending."""
    from qlora_pipeline.rundir import describe_lock
    from qlora_pipeline.runinfo import check_records, read_lock_holder, read_run_recipe
    from qlora_pipeline.runner import Runner, selection_problem
    from qlora_pipeline.stagecache import open_cache
    from qlora_pipeline.stages import build_stages

    from qlora_pipeline.errors import RecipeError

    path = Path(run_dir)
    try:
        recipe = read_run_recipe(path)
        holder = read_lock_holder(path)  # before printing: a damaged lock is reported alone
        check_records(path)
        specs = build_stages(recipe)
    except RecipeError as exc:
        if not all(_names_a_missing_input(p) for p in exc.problems):
            raise
        # The recorded recipe names inputs that are gone or moved (a corpus cleaned up, a run
        # copied to another machine): without them nothing can be judged up to date, but what
        # the run directory holds can still be told.
        _refuse_corrupt(_print_recorded_status(path, exc.problems, verify))
        return
    runner = Runner(path, specs, verify_inputs=recipe.run.verify_inputs, cache=open_cache(recipe.run.cache))
    names = {"missing": "pending"}
    width = max(len(s.name) for s in runner.specs)
    corrupt = []
    for p in runner.plan(full_verify=verify):
        click.echo(f"  {p.spec.name:<{width}}  {names.get(p.status, p.status):<8}  {p.reason}")
        if p.status == "corrupt":
            corrupt.append(p.spec.name)
    if holder:
        click.echo(describe_lock(holder))  # a dead holder's lock is stale: the next run takes it over
    _refuse_corrupt(corrupt)


def _refuse_corrupt(stages: list[str]) -> None:
    """`status` exits 2 when an output does not match its manifest, so that a script (or CI)
    checking a run directory with `--verify` is told, not only shown."""
    if stages:
        raise InputError(f"{len(stages)} stage output(s) do not match their manifests ({', '.join(stages)}); "
                         "`pipeline run` with the run's recipe rebuilds them and what read them")


def _names_a_missing_input(problem: str) -> bool:
    """A recipe problem that says a path it names is not there (any other problem means the
    record itself is wrong, which `status` reports as such)."""
    return " does not exist" in problem or "(no adapter_config.json)" in problem


def _print_recorded_status(path: Path, problems: list[str], verify: bool) -> list[str]:
    """`status` of a run whose recorded recipe no longer validates: each stage as its manifest
    records it (outputs checked against the manifest's sizes, and hashes with `verify`), not
    judged against inputs that cannot be read. Returns the stages whose output is corrupt."""
    from qlora_pipeline import rundir

    click.echo(f"{path / 'run.json'}: the recipe this run was made with does not validate here:")
    for problem in problems:
        click.echo(f"  - {problem}")
    click.echo("so whether its stages are up to date with their inputs cannot be checked (put the inputs back, "
               "or run a recipe that names where they are now); what the run directory records:")
    stages = (rundir.read_json(path / "run.json") or {}).get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        stages = sorted(p.parent.name for p in path.glob(f"*/{rundir.MANIFEST}"))
    width = max([len(s) for s in stages] + [5])
    corrupt = []
    for name in stages:
        sdir = path / name
        manifest = rundir.read_json(sdir / rundir.MANIFEST)
        if manifest is not None and rundir.good_file_table(manifest.get("files")):
            found = rundir.verify_files(sdir / rundir.OUTPUT, manifest["files"], full=verify)
            line = f"corrupt   {found[0]}" if found else f"done      finished {manifest.get('finished', '?')}"
            corrupt += [name] if found else []
        elif (sdir / rundir.CHECKPOINTS).is_dir():
            line = "partial   checkpoints of an interrupted run"
        else:
            line = "pending"
        click.echo(f"  {name:<{width}}  {line}")
    return corrupt


@cli.command()
@click.argument("recipe", type=click.Path())
@_set_option
def validate(recipe: str, sets) -> None:
    """Check a recipe; report every problem at once, each with its key path."""
    from qlora_pipeline.preflight import network_sources, run_problems
    from qlora_pipeline.stages import build_stages

    cfg, _ = _load_checked(recipe, sets)
    stages = [s.name for s in build_stages(cfg)]
    click.echo(f"{recipe}: ok ({len(stages)} stages: {', '.join(stages)})")
    note = _unchecked_model_note(cfg)
    if note:
        click.echo(note)
    for line in network_sources(cfg):
        click.echo(f"needs the network: {line}")
    for line in run_problems(cfg):
        click.echo(f"needs another machine: {line}")


class _ListOptionsCommand(click.Command):
    """A command whose list options take several values after one flag (`--context 4096 32768`):
    every value up to the next option belongs to the last list option named."""

    list_options: tuple[str, ...] = ()

    def parse_args(self, ctx, args):
        out, current, taken = [], None, 0
        for arg in args:
            if arg.startswith("--"):
                current, taken = (arg if arg in self.list_options else None), 0
            elif current is not None:
                if taken:
                    out.append(current)
                taken += 1
            out.append(arg)
        return super().parse_args(ctx, out)


class _MemoryCommand(_ListOptionsCommand):
    list_options = ("--context", "--batch", "--kv-dtype")


@cli.command(cls=_MemoryCommand)
@click.argument("path", type=click.Path(exists=True))
@click.option("--bits", type=int, default=None,
              help="Bits of the decoder linears (16: plain bf16; 2-8: packed, with fp16 scales and zeros per group); "
              "default: the checkpoint's quantization_config (a GPTQ or AWQ checkpoint's bits), else 16.")
@click.option("--group-size", type=int, default=None, help="Columns per quantization group (-1: one per row); "
              "default: the checkpoint's quantization_config, else 128.")
@click.option("--context", "contexts", type=click.IntRange(min=1), multiple=True,
              help="Tokens per sequence, one or more values (default: the recipe's deploy.contexts default).")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True,
              help="Concurrent sequences, one or more values (default: deploy.batch_sizes' default).")
@click.option("--kv-dtype", "kv_dtypes", type=click.Choice(["bf16", "fp16", "fp8"]), multiple=True,
              help="KV-cache element types, one or more (default: deploy.kv_dtypes' default, bf16 and fp8).")
@click.option("--gpu-memory-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GPU memory in GiB (default: deploy.gpu_memory_gb's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def memory(path: str, bits: Optional[int], group_size: Optional[int], contexts, batches, kv_dtypes, gpu_memory_gb,
           as_json: bool) -> None:
    """Weights + KV cache of the model whose config.json is PATH (or is in the directory PATH), for
    each context, batch and KV dtype, against one GPU; no weights are read. PATH comes first."""
    from qlora_pipeline import memory_plan
    from qlora_pipeline.recipe import DeployConfig

    if gpu_memory_gb is not None and not (math.isfinite(gpu_memory_gb) and 0 < gpu_memory_gb <= 1e6):
        raise InputError(f"--gpu-memory-gb {gpu_memory_gb:g}: give the GPU's memory in GiB, above 0 and at most "
                         "1,000,000")
    config_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        stored_bits, stored_group = _stored_quantization(config)
        quant = config.get("quantization_config")
        stored = isinstance(quant, dict) and isinstance(quant.get("group_size"), int) and stored_bits != 16
        group_said = ("--group-size" if group_size is not None else "the checkpoint's group size" if stored
                      else "the default group size")
        bits = stored_bits if bits is None else bits
        group_size = stored_group if group_size is None else group_size
        if not (2 <= bits <= 8 or bits == 16) or not (group_size == -1 or group_size >= 1):
            raise InputError(f"--bits {bits} --group-size {group_size}: give bits 2-8 (or 16) and a group size >= 1 "
                             "or -1")
        widths = {k: config[k] for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
        uneven = [f"{k} {n}" for k, n in widths.items() if bits < 16 and group_size != -1 and n % group_size]
        if uneven:  # a recipe is refused for it (`methods.check_shapes`): no checkpoint of that shape exists
            raise InputError(f"{group_said} {group_size} does not divide the model's {' or '.join(uneven)}: give "
                             "--group-size, a divisor of hidden_size and intermediate_size (32, 64 or 128 usually), "
                             "or -1")
        att = memory_plan.attention(config)
        weights = memory_plan.estimated_weight_bytes(config, bits, group_size)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InputError(f"{config_path}: not a usable model config.json ({what})") from None
    defaults = DeployConfig()
    gpu = gpu_memory_gb or defaults.gpu_memory_gb
    rows = memory_plan.plan_rows(config_path.parent.name if config_path.name == "config.json" else str(config_path),
                                 att, weights, contexts or defaults.contexts, batches or defaults.batch_sizes,
                                 kv_dtypes or defaults.kv_dtypes, gpu)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    kind = "bf16" if bits >= 16 else f"{bits}-bit, group {group_size}"
    if "quantization_config" in config and (bits, group_size) != (stored_bits, stored_group):
        kind += f"; the checkpoint itself is stored at {stored_bits} bits, group {stored_group}"
    click.echo(f"{config_path}: {att.layers} layers, {att.kv_heads} KV heads x {att.head_dim}; weights ({kind}) "
               f"{weights / memory_plan.GIB:.2f} GiB; KV cache per token: "
               + ", ".join(f"{d} {att.kv_bytes_per_token(d)} bytes" for d in dict.fromkeys(r["kv_dtype"] for r in rows)))
    for line in memory_plan.render(rows, gpu):
        click.echo(line)
    click.echo("Not counted: activations, the CUDA context, allocator fragmentation, a server's cache block granularity.")


@cli.command()
@click.option("--recipe", type=click.Path(), default=None, help="Use this recipe's tracking.uri and experiment.")
@click.option("--uri", default=None, help="Tracking store (default: the recipe's tracking.uri, else MLflow's default).")
@click.option("--experiment", default=None, help="Experiment whose runs page to show (default: the recipe's, "
              "else qlora-pipeline).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port the MLflow UI "
              "listens on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address it listens on (127.0.0.1: this "
              "machine only).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Server worker processes (one serves a user; MLflow's default, 4, takes longer to start).")
@click.option("--open", "open_browser", is_flag=True, help="Open the runs page in a web browser.")
def ui(recipe: Optional[str], uri: Optional[str], experiment: Optional[str], port: int, host: str, workers: int,
       open_browser: bool) -> None:
    """Start the MLflow UI on the tracking store the runs use (default: ./mlflow.db) and print
    the URL of the experiment's runs page."""
    import subprocess

    from qlora_pipeline.preflight import check_tracking_uri, is_sqlite, sqlite_store_path
    from qlora_pipeline.recipe import TrackingConfig
    from qlora_pipeline.tracking import default_tracking_uri, find_experiment, runs_url

    tracking = _load(recipe, ())[0].tracking if recipe else TrackingConfig()
    key = "--uri" if uri else "tracking.uri"
    uri_given = bool(uri)
    uri = uri or tracking.uri or default_tracking_uri()
    store = sqlite_store_path(uri)
    problems = check_tracking_uri(uri, key) if store is None else []  # a SQLite store: judged below
    if problems:  # MLflow's server would start, print a traceback and exit
        raise InputError(problems[0])
    if store is not None and store.is_dir():
        raise InputError(f"{key}: {store} is a folder, not a SQLite store file; give the store file the runs use, "
                         "e.g. sqlite:///mlflow.db")
    if store is not None and not store.is_file():
        # MLflow would create an empty store there (or retry for minutes where it cannot).
        if recipe and not tracking.enabled and not uri_given:
            raise InputError(f"no MLflow store at {store}: {recipe} has tracking.enabled: false, so its runs are "
                             "not tracked (their results are in the run directories: `pipeline compare`); set "
                             "tracking.enabled: true and run it, or give another store (--uri)")
        raise InputError(f"no MLflow store at {store}: `pipeline run` creates it; run a recipe first, or give the "
                         "store the runs use (--recipe RECIPE, or --uri)")
    if store is not None and not is_sqlite(store):  # the server printed two tracebacks and blamed the port
        raise InputError(f"{key}: {store} is not a SQLite database; give the store file the runs use "
                         "(--recipe RECIPE, or --uri)")
    busy = None if uri.startswith(("http://", "https://")) else _port_problem(host, port)
    if busy:  # before anything starts: another server on it would answer our URL with its own store's runs
        raise InputError(busy)
    name = experiment or tracking.experiment
    experiment_id, view = find_experiment(uri, name)
    if experiment_id is None:
        click.echo(f"no experiment '{name}' in {uri} yet; the UI opens on its experiment list", err=True)
    if uri.startswith(("http://", "https://")):  # an `mlflow server`: it serves the UI itself
        url = runs_url(uri, experiment_id, view)
        click.echo(f"MLflow UI of {uri}")
        click.echo(f"runs: {url}")
        if open_browser:
            _open_browser(url)
        return
    browse = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = runs_url(f"http://{'[' + browse + ']' if ':' in browse else browse}:{port}", experiment_id, view)
    import signal

    # Its own process group: the server, its workers and job runner stop together with us.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
                             "--port", str(port), "--workers", str(workers)], start_new_session=True)

    def stop(signum, frame):  # `kill` of this process: stop the server too (see finally)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if not _wait_for_ui(url.split("/#", 1)[0].rstrip("/"), proc):
            raise StageError(f"the MLflow UI did not start (exit code {proc.poll()}); is port {port} in use? "
                             "choose another with --port")
        click.echo(f"MLflow UI for {uri}")
        click.echo(f"runs: {url}")
        sys.stdout.flush()
        if open_browser:
            _open_browser(url)
        proc.wait()
    except KeyboardInterrupt:
        click.echo("MLflow UI stopped", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(proc)


def _stored_quantization(config: dict) -> tuple[int, int]:
    """(bits, group size) of the decoder linears as a checkpoint stores them: a GPTQ or AWQ
    checkpoint's quantization_config says; a plain one is bf16 (16, and 128 for a 4-bit estimate)."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), int):
        group = quant.get("group_size", 128)
        return quant["bits"], group if isinstance(group, int) else 128
    return 16, 128


def _port_problem(host: str, port: int) -> Optional[str]:
    """Why the UI cannot listen on host:port (None: it can), found by binding it for a moment.
    The server would fail to bind after we printed its URL, while whatever holds the port (another
    `pipeline ui` on another store, say) answered that URL."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host}: cannot listen there ({exc.strerror or exc}); give an address of this machine"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"--port {port}: something already listens on {host}:{port} (another `pipeline ui`?); " \
                       "stop it, or choose another port with --port"
            return f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"
    return None


def _stop_group(proc) -> None:
    """Stop a process started with start_new_session=True and everything in its group:
    SIGTERM, up to 10 s to finish, then SIGKILL for what is left."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.time() + 10
    while time.time() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for_ui(base: str, proc, timeout: float = 120.0) -> bool:
    """True once the UI answers on `base` + /health; False if its process ends first or it times out."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _open_browser(url: str) -> None:
    import webbrowser

    if not webbrowser.open(url):
        click.echo("no web browser found here; open the URL above yourself", err=True)


def main(argv: Optional[list[str]] = None) -> int:
    """The command's exit status; every Ctrl-C and SIGTERM is handled by the time it returns."""
    try:
        return _exit_status(argv)
    finally:
        _unmark_unhandled_interrupt()


def _exit_status(argv: Optional[list[str]]) -> int:
    try:
        cli.main(args=argv, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click's form of a KeyboardInterrupt (Ctrl-C, or SIGTERM in `run`)
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KeyboardInterrupt):
            return _interrupted(cause)
        click.echo("aborted", err=True)  # an end of input (EOFError), which click words alike
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except StageError as exc:
        click.echo(f"error: {exc}", err=True)
        if exc.__cause__ is not None and logging.getLogger().isEnabledFor(logging.DEBUG):
            import traceback

            traceback.print_exception(exc.__cause__)
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except OSError as exc:
        # The last resort for a file the machine refused outside any stage (stages report their
        # own as StageError): one line naming the file, not a traceback; -v shows where.
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            click.echo(f"error: no space left on device while writing{where}; free some space and rerun the same "
                       "command", err=True)
        else:
            click.echo(f"error:{where or ' a file operation failed'}: {exc.strerror or exc}", err=True)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            import traceback

            traceback.print_exception(exc)
        return 2
    return 0


def _interrupted(exc: BaseException) -> int:
    """The message and exit status of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    from qlora_pipeline.errors import Terminated, interruption

    click.echo(f"{interruption(exc)}; rerun the same command to resume", err=True)
    return 143 if isinstance(exc, Terminated) else 130


def _unmark_unhandled_interrupt() -> None:
    """Keep the exit status `main` gives (130 after a Ctrl-C it handled). CPython marks a Ctrl-C as unhandled
    when its KeyboardInterrupt leaves code run from a string by exec() or eval() (dataclasses,
    namedtuple and torch build functions so), keeps the mark when a caller catches it, and at exit
    kills itself with SIGINT if the mark is set and it was started as `python -m` (a parent saw
    status -2 instead of 130; seen in CI when the signal landed in such code). Running code from a
    string clears the mark, and nothing else in Python can."""
    exec("")  # nothing to run: the call itself clears the mark


if __name__ == "__main__":
    sys.exit(main())
