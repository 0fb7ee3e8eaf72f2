"""`pipeline compare`: the artifacts of several runs in one table.

Reads each run's `report/output/metrics.json` (what the `report` stage wrote), so it compares
finished runs whatever recipes they came from: two recipes differing in `merge.into` or in
group size line up row by row. Settings that differ between the runs (of a whole run, or of one
artifact's quantize entry or evaluation between that artifact's rows) are shown as columns, and so
is where each artifact was evaluated when that differs (`qlora_pipeline.environment`: another
processor or library version moves perplexities in the last digits).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlora_pipeline import rundir
from qlora_pipeline.environment import describe
from qlora_pipeline.errors import InputError
from qlora_pipeline.graph import RUN_DIR_NAME
from qlora_pipeline.recipe import flatten_settings
from qlora_pipeline.runinfo import damaged_message, damaged_records
from qlora_pipeline.stages.report import COLUMNS, format_cell, gate_cell, metrics_path

DEFAULT_COLUMNS = tuple(key for key in COLUMNS if key != "load_seconds")
PLACE = "computed on"


# Stages whose settings hold for every artifact of a run (the data, the training, the merge,
# the gate), and the per-artifact stages, by the artifact's name,
# whose settings hold for its row alone: rows of the same artifact in two runs may differ in
# either, and the table shows every setting that does.
RUN_STAGES = ("data", "train", "merge", "report")
ARTIFACT_STAGES = ("quantize-{}", "evaluate-{}")  # and the calibration stage its quantize stage read
LONG_VALUE = 24  # characters of a setting's value shown (a file's sha256 is 66 as JSON)
# Settings that name files by their sha256 (the model's, the corpus's): one digest each in
# the table, not a column per file.
CONTENT_KEYS = frozenset({"weights", "content", "adapter_files"})


def _read_object(path: Path, repair: str) -> dict:
    """A JSON object file of a run directory; else one InputError naming it and `repair`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
            else type(exc).__name__
        raise InputError(f"{path} is unreadable ({what}); {repair}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not an object; {repair}")
    return value


def _stage_settings(run_dir: Path, stages) -> dict[str, str]:
    """The flattened settings of `stages` of a run (from their manifests; a stage not run adds
    none), each value as JSON, whole: two values alike in their first characters still differ."""
    settings: dict[str, str] = {}
    for stage in stages:
        manifest = run_dir / stage / rundir.MANIFEST
        if manifest.is_file():
            config = _read_object(manifest, f"`pipeline run` re-runs the {stage} stage of {run_dir} to rewrite it")
            config = dict(config.get("config") or {})
            config.pop(RUN_DIR_NAME, None)  # the report's: its run, which the table's first column names
            for key in CONTENT_KEYS.intersection(config):  # one column for a model's or a corpus's files
                config[key] = hashlib.sha256(json.dumps(config[key], sort_keys=True).encode()).hexdigest()[:12]
            settings.update(flatten_settings(config, leaf=json.dumps))
    return settings


def _artifact_stages(run_dir: Path, name: str) -> list[str]:
    """The stages of artifact `name` whose settings are its row's own: its quantize stage, its
    evaluation, and the calibration windows (domain or general) that quantize stage read."""
    stages = [stage.format(name) for stage in ARTIFACT_STAGES]
    manifest = run_dir / stages[0] / rundir.MANIFEST
    if manifest.is_file():
        inputs = _read_object(manifest, f"`pipeline run` re-runs the {stages[0]} stage of {run_dir} to rewrite it")
        stages += sorted(d for d in (inputs.get("inputs") or {}) if str(d).startswith("calibrate"))
    return stages


def shown(value: str) -> str:
    """A setting's value as the table shows it: cut to `LONG_VALUE` characters."""
    return value if len(value) <= LONG_VALUE else value[: LONG_VALUE - 1] + "…"


def _read_report(run_dir: Path) -> dict:
    """A run's report/output/metrics.json, checked for the shape the table reads."""
    path = metrics_path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: {'is not a folder' if run_dir.exists() else 'does not exist'}; give run "
                         "directories (runs/<recipe name>, or where run.dir put them)")
    if not path.is_file():
        raise InputError(f"{run_dir}: no report (expected {path}); run the pipeline to its report stage first")
    # `pipeline run` sees the altered file against the report's manifest and writes it again.
    repair = f"run the recipe of {run_dir} again (`pipeline run RECIPE --run-dir {run_dir}`) to rebuild the report"
    damaged = damaged_records(run_dir)  # the one rule for damaged records, as `status` and `run` apply it
    if damaged:
        raise InputError(damaged_message(run_dir, damaged))
    # What the report stage wrote, or nothing: an altered metrics file is named, not tabulated.
    manifest_path = run_dir / "report" / rundir.MANIFEST
    manifest = rundir.read_json(manifest_path)
    if manifest is None:
        raise InputError(f"{manifest_path} is missing, so nothing says {path} is what the report stage wrote "
                         f"(its record deleted, or a folder put together by hand); {repair}")
    altered = rundir.verify_files(path.parent, manifest["files"], full=True)  # a few small files
    if altered:
        raise InputError(f"{altered[0]} (since the report stage wrote it); {repair}")
    report = _read_object(path, repair)
    artifacts = report.get("artifacts")
    if not isinstance(artifacts, dict) or not all(isinstance(m, dict) for m in artifacts.values()):
        raise InputError(f"{path} has no \"artifacts\" table of per-artifact metrics; {repair}")
    if not isinstance(report.get("gate", {}), dict):
        raise InputError(f"{path}: \"gate\" is not a table of per-artifact verdicts; {repair}")
    baselines = report.get("gate_baselines", [])
    if not isinstance(baselines, list) or not all(isinstance(n, str) for n in baselines):
        raise InputError(f"{path}: \"gate_baselines\" is not a list of artifact names; {repair}")
    close_calls = report.get("gate_close_calls", {})
    if not isinstance(close_calls, dict) or not all(isinstance(v, list) for v in close_calls.values()):
        raise InputError(f"{path}: \"gate_close_calls\" is not a table of per-artifact notes; {repair}")
    return report


def compare_runs(run_dirs: list[Path], columns: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Rows (run, artifact, metrics...) of every artifact of every run, and the columns to show:
    the requested metrics plus the settings that differ between the runs."""
    runs = []
    for d in run_dirs:
        report = _read_report(d)
        own = {name: _stage_settings(d, _artifact_stages(d, name)) for name in report["artifacts"]}
        runs.append((d, report, {name: {**_stage_settings(d, RUN_STAGES), **mine} for name, mine in own.items()}))
    differing = _differing([settings for _, _, settings in runs])
    if columns:
        _check_metrics(columns, [report for _, report, _ in runs])
    columns = list(columns or DEFAULT_COLUMNS)
    labels = _run_labels([d for d, _, _ in runs])
    rows = []
    for (d, report, settings), label in zip(runs, labels):
        gate = report.get("gate", {})
        baselines = set(report.get("gate_baselines", []))
        close_calls = report.get("gate_close_calls", {})
        for name, m in report["artifacts"].items():
            row = {"run": label, "artifact": name, **{k: m.get(k) for k in columns}}
            row.update({k: shown(settings[name][k]) if k in settings[name] else "–" for k in differing})
            if name in gate:
                row["gate"] = gate_cell(gate[name], name in baselines, bold=False, close_call=name in close_calls)
            env = m.get("environment")
            row[PLACE] = describe(env) if isinstance(env, dict) else "not recorded"
            rows.append(row)
    extra = differing + (["gate"] if any("gate" in r for r in rows) else [])
    extra += [PLACE] if len({r[PLACE] for r in rows}) > 1 else []
    return rows, columns + extra


def _differing(runs: list[dict[str, dict[str, str]]]) -> list[str]:
    """The settings in which some artifact differs between the runs that have it (per run:
    artifact -> its settings). Artifacts of one run differ from each other by design (one is
    GPTQ, one AWQ): only the same artifact's rows are compared."""
    keys: set[str] = set()
    for name in {n for run in runs for n in run}:
        mine = [run[name] for run in runs if name in run]
        keys |= {k for k in set().union(*mine) if len({s.get(k) for s in mine}) > 1}
    return sorted(keys)


def _run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's name in the table: its folder's name, or, where two runs share it (the same
    recipe run in two places), the path as given, so that their rows can be told apart."""
    names = [d.name for d in run_dirs]
    return [str(d) if names.count(d.name) > 1 else d.name for d in run_dirs]


def _check_metrics(columns: list[str], reports: list[dict]) -> None:
    """A requested metric that no artifact of any run has (a typo) is named, with the keys there are."""
    present = {k for report in reports for m in report["artifacts"].values() for k in m}
    unknown = [c for c in columns if c not in present]
    if unknown:
        known = sorted({k for report in reports for m in report["artifacts"].values() for k, v in m.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        raise InputError(f"--metric {', '.join(unknown)}: no artifact of these runs has it; metrics there: "
                         f"{', '.join(known)}")


def render(rows: list[dict], columns: list[str], markdown: bool) -> str:
    head = ["run", "artifact"] + [COLUMNS[c][0] if c in COLUMNS else c for c in columns]
    body = [[r["run"], r["artifact"]] + [format_cell(c, r.get(c)) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
