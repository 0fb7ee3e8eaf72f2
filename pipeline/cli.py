"""`pipeline`: run a recipe's stages, show what would run, inspect a run, open the MLflow UI.

Exit codes: 0 success, 1 a stage failed, 2 bad input (recipe, paths, data, a busy run dir).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import click

from pipeline.errors import InputError, StageError

logger = logging.getLogger("pipeline")

EPILOG = """\b
Examples:
  pipeline validate recipes/smollm2_domain.yaml
  pipeline plan recipes/smollm2_domain.yaml --set nf4.blocksize=128
  pipeline run recipes/smollm2_domain.yaml
  pipeline run recipes/smollm2_domain.yaml --from evaluate-base-nf4
  pipeline status runs/smollm2_domain
  pipeline ui
"""


def _setup_logging(verbose: bool) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not for users
    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:
        level = logging.WARNING  # one voice per launch: the main process reports
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "mlflow", "urllib3", "huggingface_hub", "alembic", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load(recipe_path: str, sets: tuple[str, ...]):
    from pipeline.recipe import load_recipe

    return load_recipe(recipe_path, list(sets))


def _runner(recipe, run_dir: Optional[str], with_tracking: bool):
    from pipeline.recipe import flatten
    from pipeline.runner import Runner
    from pipeline.stages import build_stages
    from pipeline.tracking import Tracker

    directory = Path(run_dir) if run_dir else Path(recipe.run.dir) / recipe.run.name
    specs = build_stages(recipe)
    tracker = None
    is_main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch only rank 0 tracks
    if with_tracking and recipe.tracking.enabled and is_main:
        tracker = Tracker(recipe.tracking.uri, recipe.tracking.experiment)
    return Runner(directory, specs, recipe, tracker, recipe_dump=recipe.model_dump(mode="json"), params=flatten(recipe))


def _print_plan(planned) -> None:
    width = max(len(p.spec.name) for p in planned)
    for p in planned:
        click.echo(f"  {p.spec.name:<{width}}  {p.action:<4}  {p.status:<8}  {p.reason}")


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Fine-tune an LLM on your domain with QLoRA and ship it quantized, from one YAML recipe.

    Stages: data -> base (NF4) -> evaluate-* -> report. Each stage is checkpointed in the run
    directory (runs/<recipe name>/ by default) and tracked in MLflow; rerunning a command
    skips what is up to date and resumes what was interrupted.
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
    cfg, _ = _load(recipe, sets)
    runner = _runner(cfg, run_dir, with_tracking=True)
    logger.info("run directory: %s", runner.run_dir)
    planned = runner.run(from_stage=from_stage, only=only, force=force)
    ran = [p.spec.name for p in planned if p.action == "run"]
    logger.info("done: %d stage(s) ran, %d up to date", len(ran), len(planned) - len(ran))
    report = runner.run_dir / "report" / "output" / "report.md"
    if report.is_file() and int(os.environ.get("RANK", "0")) == 0:
        click.echo(report.read_text())
    if runner.tracker and runner.tracker.enabled:
        logger.info("tracking: %s (open it with `pipeline ui`)", runner.tracker.uri)
    from pipeline.stages.report import gate_failures

    failed = gate_failures(runner.run_dir)
    if failed:
        for name, reasons in failed.items():
            click.echo(f"quality gate failed: {name}: {'; '.join(reasons)}", err=True)
        raise StageError(f"{len(failed)} artifact(s) failed the quality gate (evaluate.gate); the other stages "
                         "finished. Loosen the threshold or change the quantizer settings.")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--markdown", "markdown", type=click.Path(), default=None, help="Also write the table as markdown to this file.")
@click.option("--metric", "metrics", multiple=True, help="Columns to show (default: perplexities, size, speed).")
def compare(run_dirs, markdown, metrics) -> None:
    """One table of the artifacts of several runs (their report/output/metrics.json)."""
    from pipeline.compare import compare_runs, render

    rows, columns = compare_runs([Path(d) for d in run_dirs], list(metrics) or None)
    click.echo(render(rows, columns, markdown=False))
    if markdown:
        Path(markdown).write_text(render(rows, columns, markdown=True) + "\n")
        click.echo(f"written: {markdown}")


@cli.command()
@click.argument("recipe", type=click.Path())
@_set_option
@_run_dir_option
@click.option("--from", "from_stage", metavar="STAGE")
@click.option("--only", metavar="STAGE")
@click.option("--force", is_flag=True)
def plan(recipe: str, sets, run_dir, from_stage, only, force) -> None:
    """Show the stage graph and, per stage, whether `run` would run or skip it, and why."""
    cfg, _ = _load(recipe, sets)
    runner = _runner(cfg, run_dir, with_tracking=False)
    click.echo(f"run directory: {runner.run_dir}")
    _print_plan(runner.plan(from_stage, only, force))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-hash every output file against its manifest.")
def status(run_dir: str, verify: bool) -> None:
    """Per stage of RUN_DIR: done, partial (resume point), failed (error), stale or pending."""
    from pipeline.recipe import Recipe
    from pipeline.runner import Runner
    from pipeline.stages import build_stages

    path = Path(run_dir)
    run_json = path / "run.json"
    if not run_json.is_file():
        raise InputError(f"{path} is not a run directory (no run.json); runs are created by `pipeline run`")
    recipe = Recipe.model_validate(json.loads(run_json.read_text())["recipe"])
    runner = Runner(path, build_stages(recipe), recipe)
    lock = path / ".lock"
    holder = json.loads(lock.read_text()) if lock.is_file() else None
    names = {"missing": "pending"}
    width = max(len(s.name) for s in runner.specs)
    for p in runner.plan(full_verify=verify):
        click.echo(f"  {p.spec.name:<{width}}  {names.get(p.status, p.status):<8}  {p.reason}")
    if holder:
        click.echo(f"lock held by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}")


@cli.command()
@click.argument("recipe", type=click.Path())
@_set_option
def validate(recipe: str, sets) -> None:
    """Check a recipe; report every problem at once, each with its key path."""
    from pipeline.stages import build_stages

    cfg, _ = _load(recipe, sets)
    stages = [s.name for s in build_stages(cfg)]
    click.echo(f"{recipe}: ok ({len(stages)} stages: {', '.join(stages)})")


@cli.command()
@click.option("--recipe", type=click.Path(), default=None, help="Use this recipe's tracking.uri.")
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def ui(recipe: Optional[str], port: int, host: str) -> None:
    """Start the MLflow UI on the tracking store the runs use (default: ./mlflow.db)."""
    from pipeline.tracking import default_tracking_uri

    uri = (_load(recipe, ())[0].tracking.uri if recipe else None) or default_tracking_uri()
    click.echo(f"MLflow UI for {uri} at http://{host}:{port}")
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", host, "--port", str(port)])


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cli.main(args=argv, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
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
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
