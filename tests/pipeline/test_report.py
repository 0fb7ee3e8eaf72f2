"""Evaluation and comparison: speed, memory and generations per artifact, the quality gate, the
report's plots, `pipeline compare`, and the same figures in the MLflow store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, tiny_recipe
from tests.conftest import random_adapter

PROMPTS = ["def fibonacci(n):", "The with statement"]


def _recipe(model_dir, tmp_path, name, adapter, quantize, **sections):
    r = tiny_recipe(model_dir, tmp_path, run={"name": name}, merge={"adapter": str(adapter)},
                    calibration={"samples": 4, "seq_len": 128},
                    evaluate={**tiny_recipe(model_dir, tmp_path)["evaluate"], "prompts": PROMPTS, "max_new_tokens": 6,
                              "decode_tokens": 4, **sections.pop("evaluate", {})}, **sections)
    r["quantize"] = quantize
    return r


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_llama_dir, smollm2_dir):
    """A tiny random model (fast, every feature) and the real SmolLM2, where quality means
    something: 4-bit and 2-bit round-to-nearest under a 100% gate."""
    import yaml

    tmp = tmp_path_factory.mktemp("report")
    codes = {}
    for name, model, quantize, evaluate in (
        ("g32", tiny_llama_dir, [{"name": "rtn", "method": "rtn", "group_size": 32}], {}),
        ("bad", smollm2_dir, [{"name": "rtn", "method": "rtn", "group_size": 64},
                              {"name": "rtn-2bit", "method": "rtn", "bits": 2, "group_size": 64}],
         {"gate": {"max_domain_ppl_increase": 100.0}, "prompts": [], "speed": False}),
    ):
        adapter = random_adapter(model, tmp / f"adapter-{name}")
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_recipe(model, tmp, name, adapter, quantize, evaluate=evaluate)))
        codes[name] = cli("run", str(path))
    return tmp, codes


def test_every_artifact_has_speed_memory_and_the_same_generations(two_runs):
    tmp, codes = two_runs
    assert codes["g32"] == 0
    report = json.loads((tmp / "runs" / "g32" / "report" / "output" / "metrics.json").read_text())["artifacts"]
    assert set(report) == {"base", "base-nf4", "merged", "rtn"}
    for name, m in report.items():
        assert m["prefill_tokens_per_second"] > 0 and m["decode_tokens_per_second"] > 0
        assert m["peak_memory_bytes"] > 0 and m["size_bytes"] > 0 and m["load_seconds"] >= 0
        assert [g["prompt"] for g in m["generations"]] == PROMPTS
    text = (tmp / "runs" / "g32" / "report" / "output" / "report.md").read_text()
    assert "decode tok/s" in text and "## Generations (greedy)" in text and "`def fibonacci(n):`" in text
    places = {json.dumps(m["environment"], sort_keys=True) for m in report.values()}
    assert len(places) == 1 and "\nEvaluations computed on cpu: " in text and "different places" not in text


def test_report_plots_are_pngs(two_runs):
    tmp, _ = two_runs
    out = tmp / "runs" / "g32" / "report" / "output"
    for name in ("ppl_vs_size.png", "layer_error.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "report.md").read_text()


def test_the_gate_fails_two_bit_round_to_nearest_after_finishing(two_runs, capsys):
    tmp, codes = two_runs
    assert codes["bad"] == 1
    run_dir = tmp / "runs" / "bad"
    report = json.loads((run_dir / "report" / "output" / "metrics.json").read_text())
    assert report["gate"]["rtn"] == []  # 4-bit passes
    assert report["gate"]["rtn-2bit"] and "max_domain_ppl_increase: 100%" in report["gate"]["rtn-2bit"][0]
    assert "**FAILED**" in (run_dir / "report" / "output" / "report.md").read_text()
    # every stage finished, the failing artifact's included
    assert all((run_dir / s / "manifest.json").exists() for s in ("evaluate-rtn-2bit", "evaluate-rtn", "report"))


def test_gate_message_names_the_artifact_and_threshold(two_runs, capsys):
    tmp, _ = two_runs
    assert cli("run", str(tmp / "bad.yaml")) == 1  # up to date, still failing
    err = capsys.readouterr().err
    assert "quality gate failed: rtn-2bit: domain perplexity" in err and "evaluate.gate.max_domain_ppl_increase" in err


def test_compare_lines_up_two_runs(two_runs, capsys, tmp_path):
    tmp, _ = two_runs
    md = tmp_path / "compare.md"
    assert cli("compare", str(tmp / "runs" / "g32"), str(tmp / "runs" / "bad"), "--markdown", str(md)) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith(("g32", "bad"))]
    assert len(lines) == 4 + 5 and "domain ppl" in out and "FAILED" in out
    # The report's settings hold its run directory's name; the run column already names it.
    assert "run_dir_name" not in out and "run_dir_name" not in md.read_text()
    assert md.read_text().startswith("| run | artifact | domain ppl")
    assert cli("compare", str(tmp_path / "nothing")) == 2
    assert f"{tmp_path / 'nothing'}: does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli("compare", str(tmp_path / "empty")) == 2
    assert "no report" in capsys.readouterr().err
    # A metric no artifact has (a typo) is named, not shown as a column of dashes.
    assert cli("compare", str(tmp / "runs" / "g32"), "--metric", "domian_ppl") == 2
    err = capsys.readouterr().err
    assert "--metric domian_ppl: no artifact of these runs has it" in err and "domain_ppl" in err


def test_compare_tells_apart_two_runs_of_the_same_name(two_runs, capsys, tmp_path):
    """The same recipe run in two places: both rows were labelled with the folder's name."""
    import shutil

    tmp, _ = two_runs
    copy = Path(shutil.copytree(tmp / "runs" / "g32", tmp_path / "elsewhere" / "g32"))
    assert cli("compare", str(tmp / "runs" / "g32"), str(copy), "--metric", "domain_ppl") == 0
    out = capsys.readouterr().out
    assert f"{tmp / 'runs' / 'g32'}  " in out and f"{copy}  " in out


def test_mlflow_has_the_same_metric_names_on_both_parent_runs(two_runs):
    from mlflow.tracking import MlflowClient

    tmp, _ = two_runs
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qlora-pipeline")
    runs = client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId IS NULL")
    parents = {r.info.run_name.split(" @ ", 1)[0]: r for r in runs}  # named "<recipe> @ <run directory>"
    assert {"g32", "bad"} <= set(parents)
    for name in ("g32", "bad"):
        assert {"merged.domain_ppl", "rtn.domain_ppl", "rtn.size_bytes"} <= set(parents[name].data.metrics)
    assert parents["bad"].data.metrics["rtn-2bit.gate_passed"] == 0.0
    # each quantized artifact's change over merged, with the ends of its 95% interval
    metrics = parents["bad"].data.metrics
    assert metrics["rtn.domain_vs_merged_low"] < metrics["rtn.domain_vs_merged"] < metrics["rtn.domain_vs_merged_high"]
    assert "merged.domain_vs_merged" not in metrics


def test_a_baseline_that_fails_the_gate_is_reported_and_does_not_fail_the_run(two_runs, capsys):
    """`quantize[].baseline`: the same verdict, marked as a baseline, exit 0; only the report
    re-runs (the setting changes no quantized or evaluated output)."""
    tmp, _ = two_runs
    run_dir = tmp / "runs" / "bad"
    manifests = {s: (run_dir / s / "manifest.json").read_bytes() for s in ("quantize-rtn-2bit", "evaluate-rtn-2bit")}
    capsys.readouterr()
    assert cli("run", str(tmp / "bad.yaml"), "--set", "quantize.1.baseline=true") == 0
    err = capsys.readouterr().err
    assert "quality gate: baseline rtn-2bit fails it" in err and "quality gate failed" not in err
    assert {s: (run_dir / s / "manifest.json").read_bytes() for s in manifests} == manifests
    report = json.loads((run_dir / "report" / "output" / "metrics.json").read_text())
    assert report["gate"]["rtn-2bit"] and report["gate_baselines"] == ["rtn-2bit"]
    text = (run_dir / "report" / "output" / "report.md").read_text()
    assert "| **FAILED** (baseline) |" in text and "## Quality gate: baselines that fail it" in text
    assert "## Quality gate: failed" not in text
    assert cli("compare", str(run_dir)) == 0
    assert "FAILED (baseline)" in capsys.readouterr().out
    assert cli("run", str(tmp / "bad.yaml")) == 1  # no longer a baseline: the run fails again


def test_the_report_says_when_two_quantized_artifacts_differ_beyond_the_windows_spread(two_runs):
    """Real SmolLM2: 2-bit round-to-nearest against 4-bit, window by window: far apart, the
    interval well clear of 0; each artifact's per-window NLLs give its perplexity."""
    import math

    tmp, _ = two_runs
    out = tmp / "runs" / "bad" / "report" / "output"
    report = json.loads((out / "metrics.json").read_text())
    for m in report["artifacts"].values():
        assert len(m["domain_window_nll"]) == m["domain_tokens"] // 127 and len(m["general_window_nll"]) > 1
        assert math.isclose(math.exp(sum(m["domain_window_nll"]) / m["domain_tokens"]), m["domain_ppl"], rel_tol=1e-12)
    (row,) = report["pairwise"]
    assert (row["artifact"], row["against"]) == ("rtn", "rtn-2bit")
    assert row["domain"]["high"] < 0 and row["general"]["high"] < 0
    assert row["domain"]["told_apart"] and row["general"]["told_apart"]
    merged, rtn = report["artifacts"]["merged"], report["artifacts"]["rtn"]
    assert row["domain"]["low"] < 100 * (rtn["domain_ppl"] / report["artifacts"]["rtn-2bit"]["domain_ppl"] - 1) < row["domain"]["high"]
    text = (out / "report.md").read_text()
    increase = 100 * (rtn["domain_ppl"] / merged["domain_ppl"] - 1)
    assert (f"| {increase:+.2f}% ±" in text or f"| {increase:+.2f}% [" in text)
    assert "## Quantized artifacts against each other" in text and "(not told apart)" not in text


def test_a_change_cell_shows_its_interval_by_half_width_or_by_its_ends_when_lopsided():
    from qlora_pipeline.stages.report import change_cell

    ref = {"domain_ppl": 10.0, "domain_tokens": 300, "domain_window_nll": [700.0, 690.0, 710.0]}
    near = {"domain_ppl": 10.1, "domain_tokens": 300, "domain_window_nll": [703.0, 692.0, 714.0]}
    far = {"domain_ppl": 40.0, "domain_tokens": 300, "domain_window_nll": [1100.0, 900.0, 1200.0]}
    assert change_cell(near, ref).startswith("+1.00% ±")
    assert change_cell(far, ref).startswith("+300.00% [")
    assert change_cell({"domain_ppl": 11.0}, ref) == "+10.00%"  # no per-window NLLs: no interval
    assert change_cell({**near, "domain_tokens": 200, "domain_window_nll": [1.0, 2.0]}, ref) == "+1.00%"


def test_a_perplexity_that_is_not_a_number_fails_the_gate():
    """NaN compares false with every limit: an artifact whose weights broke (or a merged model
    that did) passed the gate with '+nan%'."""
    from qlora_pipeline.stages.report import gate_verdicts

    gate = {"max_domain_ppl_increase": 20, "max_general_ppl_increase": 20}
    good, nan = {"domain_ppl": 11.0, "general_ppl": 4.0}, float("nan")
    verdicts = gate_verdicts({"merged": good, "gptq": {"domain_ppl": nan, "general_ppl": 4.1},
                              "awq": {"domain_ppl": 11.5, "general_ppl": float("inf")}, "rtn": dict(good)}, gate)
    assert verdicts["rtn"] == []
    assert verdicts["gptq"] == ["domain perplexity of gptq is nan (not a number the gate can compare; "
                                "evaluate.gate.max_domain_ppl_increase: 20%)"]
    assert len(verdicts["awq"]) == 1 and "general perplexity of awq is inf" in verdicts["awq"][0]
    broken_merged = gate_verdicts({"merged": {"domain_ppl": nan, "general_ppl": 4.0}, "rtn": dict(good)}, gate)
    assert broken_merged["rtn"] and "perplexity of merged is nan" in broken_merged["rtn"][0]
    assert gate_verdicts({"merged": good, "gptq": {"domain_ppl": nan, "general_ppl": 4.1}}, {}) == {"gptq": []}


def _evaluation(name: str, change_percent: float, spread: float, merged_nll: list[float], tokens: int,
                general: tuple[float, float] = (0.0, 0.0)) -> dict:
    """An artifact's metrics whose per-window NLLs, on each split, are the merged model's plus a
    change (as a perplexity change in percent) plus alternating +-spread nats per window:
    (`change_percent`, `spread`) on the domain text, `general` on the general text."""
    import math

    out = {"artifact": name, "device": "cpu", "dtype": "float32", "size_bytes": 1e6, "generations": []}
    for split, (change, wobble) in (("domain", (change_percent, spread)), ("general", general)):
        step = math.log1p(change / 100) * tokens
        nll = [m + step + (wobble if i % 2 else -wobble) for i, m in enumerate(merged_nll)]
        total = tokens * len(nll)
        out.update({f"{split}_ppl": math.exp(sum(nll) / total), f"{split}_tokens": float(total),
                    f"{split}_window_nll": nll})
    return out


def test_a_gate_verdict_more_text_could_turn_is_reported_as_a_close_call(tmp_path):
    """The gate judges the point figure; a verdict that more held-out text could turn is marked a
    close call in the report, metrics.json, MLflow's tags, `compare` and `pipeline run`'s line:
    a pass with a change whose 95% interval holds its limit (domain or general), a fail whose
    every failing change does. A clear verdict is not marked, nor a fail that stands whatever
    the borderline split shows (a change clearly over its limit, a perplexity that is NaN)."""
    from qlora_pipeline import rundir
    from qlora_pipeline.compare import compare_runs
    from qlora_pipeline.graph import StageContext
    from qlora_pipeline.stages.report import gate_close_calls, gate_close_calls_of, gate_verdicts, run

    tokens = 100
    merged_nll = [230.0 + (7.0 if i % 3 else -5.0) for i in range(10)]
    clear, close = 0.5, 4.0  # nats of spread per window: about +-0.4 and +-3 points of interval
    specs = {"merged": (0.0, 0.0, (0.0, 0.0)),
             "clear-pass": (5.0, clear, (3.0, clear)),
             "close-pass": (19.0, close, (3.0, clear)),          # domain: interval holds 20
             "close-pass-general": (5.0, clear, (14.0, close)),  # general: interval holds 15
             "close-fail": (21.0, close, (3.0, clear)),
             "clear-fail": (40.0, clear, (3.0, clear)),
             "clear-fail-close-general": (40.0, clear, (14.0, close)),  # the domain failure stands
             "nan-general": (19.0, close, (3.0, clear)),          # NaN fails it whatever the domain shows
             "baseline-close": (21.0, close, (3.0, clear))}
    artifacts = {n: _evaluation(n, d, w, merged_nll, tokens, g) for n, (d, w, g) in specs.items()}
    artifacts["nan-general"]["general_ppl"] = float("nan")
    artifacts["nan-general"]["general_window_nll"][3] = float("nan")
    gate = {"max_domain_ppl_increase": 20, "max_general_ppl_increase": 15}
    verdicts = gate_verdicts(artifacts, gate)
    assert [n for n, r in verdicts.items() if r] == ["close-fail", "clear-fail", "clear-fail-close-general",
                                                     "nan-general", "baseline-close"]
    calls = gate_close_calls(artifacts, gate)
    assert sorted(calls) == ["baseline-close", "close-fail", "close-pass", "close-pass-general"]
    assert calls["close-pass"] == [calls["close-pass"][0]] and \
        "its domain change +19.00% has the 95% interval [+" in calls["close-pass"][0] and \
        "holds the 20% limit (evaluate.gate.max_domain_ppl_increase)" in calls["close-pass"][0]
    assert len(calls["close-pass-general"]) == 1 and \
        "its general change +14.00%" in calls["close-pass-general"][0] and \
        "holds the 15% limit (evaluate.gate.max_general_ppl_increase)" in calls["close-pass-general"][0]
    assert gate_close_calls(artifacts, {"max_domain_ppl_increase": 10, "max_general_ppl_increase": 30}) == {}
    assert gate_close_calls(artifacts, {"max_domain_ppl_increase": None}) == {}
    # no per-window NLLs (an evaluation from before they were kept): no interval, no close call
    bare = {n: {k: v for k, v in m.items() if not k.endswith("_window_nll")} for n, m in artifacts.items()}
    assert gate_close_calls(bare, gate) == {}

    inputs = {}
    for name, m in artifacts.items():
        out = tmp_path / "inputs" / name
        out.mkdir(parents=True)
        out.joinpath("metrics.json").write_text(json.dumps(m))
        inputs[f"evaluate-{name}"] = out
    tags = {}

    class Metrics:
        def log_metrics(self, *a, **k): ...
        def log_artifact(self, *a, **k): ...
        def set_tags(self, t): tags.update(t)

    run_dir = tmp_path / "run"
    ctx = StageContext(name="report", config={"gate": gate, "seq_len": tokens, "deploy": {},
                                              "gate_baselines": ["baseline-close"]},
                       inputs=inputs, output_dir=run_dir / "report" / "output", checkpoint_dir=tmp_path / "ckpt",
                       metrics=Metrics(), progress=lambda it, **kw: it, run_dir=run_dir)
    ctx.output_dir.mkdir(parents=True)
    result = run(ctx)
    text = (ctx.output_dir / "report.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.rstrip(" |").rsplit(" | ", 1)[1] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| artifact") and line.count("|") > 8}
    assert rows == {"merged": "–", "clear-pass": "passed", "close-pass": "passed (close call)",
                    "close-pass-general": "passed (close call)", "close-fail": "**FAILED** (close call)",
                    "clear-fail": "**FAILED**", "clear-fail-close-general": "**FAILED**", "nan-general": "**FAILED**",
                    "baseline-close": "**FAILED** (baseline, close call)"}
    section = text.split("## Quality gate: close calls")[1].split("\n## ")[0]
    assert "- **close-pass** (passed): its domain change +19.00% has the 95% interval [" in section
    assert "- **close-fail** (failed): its domain change +21.00%" in section
    assert "- **baseline-close** (failed, a baseline: not counted): its domain change +21.00%" in section
    assert "clear-fail" not in section and "nan-general" not in section
    report = json.loads((ctx.output_dir / "metrics.json").read_text())
    assert sorted(report["gate_close_calls"]) == sorted(calls)
    assert tags == {"gate.close-pass": "passed (close call)", "gate.close-pass-general": "passed (close call)",
                    "gate.close-fail": "failed (close call)", "gate.clear-fail": "failed",
                    "gate.clear-fail-close-general": "failed", "gate.nan-general": "failed",
                    "gate.baseline-close": "failed (baseline, close call)"}
    assert result.metrics["close-pass.gate_close_call"] == 1.0 and result.metrics["clear-pass.gate_close_call"] == 0.0
    lines = gate_close_calls_of(run_dir)  # what `pipeline run` prints, one line each
    assert sorted(lines) == sorted(calls)
    assert lines["close-pass"].startswith("passed; its domain change +19.00%")
    assert lines["baseline-close"].startswith("failed, a baseline: not counted; its domain change +21.00%")
    # the report stage's record, as the runner writes it, so that `compare` reads this report
    rundir.write_json_atomic(run_dir / "report" / rundir.MANIFEST,
                             {"fingerprint": "f" * 64, "files": rundir.describe_files(ctx.output_dir)})
    compared = {r["artifact"]: r["gate"] for r in compare_runs([run_dir])[0] if "gate" in r}
    assert compared == {n: cell.replace("**", "") for n, cell in rows.items() if n != "merged"}


def test_a_report_with_the_gate_on_records_that_it_found_no_close_calls(tmp_path):
    """`gate_close_calls` is written even when empty, so a reader tells "none" from a report
    made before close calls existed; without a gate there is nothing to record."""
    from qlora_pipeline.graph import StageContext
    from qlora_pipeline.stages.report import run

    merged_nll = [230.0 + (7.0 if i % 3 else -5.0) for i in range(10)]
    for gate, expected in (({"max_domain_ppl_increase": 20}, {}), ({}, None)):
        out = tmp_path / str(bool(gate))
        inputs = {}
        for name, change in (("merged", 0.0), ("gptq", 5.0)):
            folder = out / "inputs" / name
            folder.mkdir(parents=True)
            folder.joinpath("metrics.json").write_text(json.dumps(_evaluation(name, change, 0.5, merged_nll, 100)))
            inputs[f"evaluate-{name}"] = folder

        class Metrics:
            def log_metrics(self, *a, **k): ...
            def log_artifact(self, *a, **k): ...
            def set_tags(self, *a, **k): ...

        ctx = StageContext(name="report", config={"gate": gate, "seq_len": 100, "deploy": {}}, inputs=inputs,
                           output_dir=out / "report", checkpoint_dir=out / "ckpt", metrics=Metrics(),
                           progress=lambda it, **kw: it, run_dir=out)
        ctx.output_dir.mkdir()
        run(ctx)
        report = json.loads((ctx.output_dir / "metrics.json").read_text())
        assert report.get("gate_close_calls") == expected
