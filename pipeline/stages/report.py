"""Stage `report`: every evaluated artifact side by side, the quality gate, and plots.

Writes to `report/output/`: `report.md` (one table, rows = artifacts; the deployment memory plan;
the generations of the recipe's prompts side by side), `metrics.json` (everything in the
tables, the gate's verdicts, the memory plan's rows), and PNG plots: domain perplexity against
size, the training loss curve, the per-layer quantization error of each quantizer, total memory
(weights + KV cache) against context. All logged to MLflow: artifacts, and metrics named
`<artifact>.<metric>` (the same names in every run, so MLflow's compare view lines them up),
on this stage's run and on the pipeline's parent run.

Every change of perplexity between two artifacts comes with a 95% interval where both kept
their per-window NLLs (`qlora_pipeline.paired`), and every two quantized artifacts are compared
that way, so the report says when its text cannot tell two methods apart.

The gate: a quantized artifact whose perplexity increase over the merged model exceeds
`evaluate.gate` is marked failed here and in MLflow; `pipeline run` finishes the other stages
and then exits non-zero (see `gate_failures`). The verdict is taken on the point figures; one
that more held-out text could turn (a change's 95% interval holds its limit, and no other change
fails it clearly) is marked a close call (`gate_close_calls`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from qlora_pipeline import memory_plan, rundir
from qlora_pipeline.environment import describe
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.paired import PairedChange, paired_change

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"  # the artifacts' metrics and the gate's verdicts (`compare` and MLflow read it)

# The table's columns, {metric: (header, format)}; `pipeline compare` shows the same. Bytes in MB.
COLUMNS = {"domain_ppl": ("domain ppl", "{:.3f}"), "general_ppl": ("general ppl", "{:.3f}"),
           "size_bytes": ("size (MB)", "{:.1f}"), "quantize_seconds": ("quantize (s)", "{:.0f}"),
           "load_seconds": ("load (s)", "{:.1f}"), "peak_memory_bytes": ("peak mem (MB)", "{:.1f}"),
           "prefill_tokens_per_second": ("prefill tok/s", "{:.0f}"),
           "decode_tokens_per_second": ("decode tok/s", "{:.1f}")}
FIXED = ("base", "base-nf4", "merged")
# With evaluate.kv_fp8: the domain perplexity with an fp8 KV cache, as a change over the artifact's own.
KV_FP8_COLUMNS = {"kv_fp8_domain_ppl": "Δ fp8 KV", "kv_fp8_calibrated_domain_ppl": "Δ fp8 KV (calibrated)"}


def format_cell(key: str, value) -> str:
    """A metric as the tables show it: '–' when absent, bytes in MB, numbers in the column's format."""
    if value is None:
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if key.endswith("_bytes"):
        value = value / 1e6
    return COLUMNS.get(key, (None, "{:.3f}"))[1].format(value)


def increase(m: dict, ref: dict | None, key: str) -> float | None:
    if ref is None or key not in m or key not in ref:
        return None
    return 100 * (m[key] / ref[key] - 1)


def paired(m: dict, ref: dict | None, split: str = "domain") -> PairedChange | None:
    """`m`'s perplexity on `split` over `ref`'s, window by window, with its 95% interval; None
    when either lacks per-window NLLs (an evaluation from before they were kept) or the two were
    not scored on the same windows."""
    key, tokens = f"{split}_window_nll", f"{split}_tokens"
    if ref is None or key not in m or key not in ref or m.get(tokens) != ref.get(tokens) or not m[key]:
        return None
    return paired_change(m[key], ref[key], int(m[tokens]) // len(m[key]))


def change_cell(m: dict, ref: dict | None, split: str = "domain") -> str:
    """A perplexity change in percent, with the half-width of its 95% interval where known."""
    inc = increase(m, ref, f"{split}_ppl")
    if inc is None:
        return "–"
    pc = paired(m, ref, split)
    if pc is None:
        return f"{inc:+.2f}%"
    # exp() makes a wide interval lopsided; then both ends are shown
    if abs((pc.high - pc.percent) - (pc.percent - pc.low)) <= 0.1 * pc.half_width:
        return f"{inc:+.2f}% ±{pc.half_width:.2f}"
    return f"{inc:+.2f}% [{pc.low:+.2f}, {pc.high:+.2f}]"


def pairwise(artifacts: dict[str, dict]) -> list[dict]:
    """Every two quantized artifacts compared window by window on each split, the one with the
    lower domain perplexity first: whether the evaluation text tells them apart at all."""
    quantized = sorted((n for n in artifacts if n not in FIXED and "domain_ppl" in artifacts[n]),
                       key=lambda n: artifacts[n]["domain_ppl"])
    rows = []
    for i, a in enumerate(quantized):
        for b in quantized[i + 1:]:
            row = {"artifact": a, "against": b}
            for split in ("domain", "general"):
                pc = paired(artifacts[a], artifacts[b], split)
                if pc is not None:
                    row[split] = {**pc._asdict(), "told_apart": pc.excludes_zero}
            if len(row) > 2:
                rows.append(row)
    return rows


def _pairwise_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Quantized artifacts against each other", "",
             "Perplexity of the first over the second, window by window on the same windows, with a 95% "
             "interval from the spread of the per-window differences (windows taken as independent: a lower "
             "bound on the uncertainty). An interval that holds 0 means this text does not tell the two apart.",
             "", "| artifact | against | domain | general |", "|---|---|---|---|"]

    def cell(pc: dict | None) -> str:
        if pc is None:
            return "–"
        verdict = "" if pc["told_apart"] else " (not told apart)"
        return f"{pc['percent']:+.2f}% [{pc['low']:+.2f}, {pc['high']:+.2f}]{verdict}"

    return lines + [f"| {r['artifact']} | {r['against']} | {cell(r.get('domain'))} | {cell(r.get('general'))} |"
                    for r in rows]


GATED = (("domain", "max_domain_ppl_increase"), ("general", "max_general_ppl_increase"))


def _gate_check(name: str, m: dict, merged: dict | None, split: str, limit_key: str, limit: float) -> str | None:
    """Why artifact `name` fails the gate's limit on `split` (None: it meets it)."""
    key = f"{split}_ppl"
    # NaN compares false with every limit: a broken artifact (or merged model) must fail.
    broken = [(who, x[key]) for who, x in ((name, m), ("merged", merged or {}))
              if isinstance(x.get(key), float) and not math.isfinite(x[key])]
    if broken:
        who, value = broken[0]
        return (f"{split} perplexity of {who} is {value} (not a number the gate can compare; "
                f"evaluate.gate.{limit_key}: {limit:g}%)")
    inc = increase(m, merged, key)
    if inc is not None and inc > limit:
        return (f"{split} perplexity {m[key]:.3f} is {inc:+.2f}% over the merged model's "
                f"{merged[key]:.3f} (evaluate.gate.{limit_key}: {limit:g}%)")
    return None


def gate_verdicts(artifacts: dict[str, dict], gate: dict) -> dict[str, list[str]]:
    """Reasons each quantized artifact fails the gate (an empty list: it passes)."""
    merged = artifacts.get("merged")
    return {name: [r for split, limit_key in GATED if gate.get(limit_key) is not None
                   for r in [_gate_check(name, m, merged, split, limit_key, gate[limit_key])] if r]
            for name, m in artifacts.items() if name not in FIXED}


def gate_close_calls(artifacts: dict[str, dict], gate: dict) -> dict[str, list[str]]:
    """The quantized artifacts whose verdict more held-out text could turn, each with the gated
    changes whose 95% interval holds the limit: a pass with any such change; a fail whose every
    failing change is such a change (one clearly over its limit, or a perplexity that is not a
    number, fails it whatever the rest shows). Changes without per-window NLLs have no interval
    and are never close calls. The interval takes windows as independent, so it is a lower
    bound on the uncertainty: an unmarked verdict near its limit is not settled either."""
    merged = artifacts.get("merged")
    calls = {}
    for name, m in artifacts.items():
        if name in FIXED:
            continue
        notes, failing, failing_close = [], 0, 0
        for split, limit_key in GATED:
            limit = gate.get(limit_key)
            if limit is None:
                continue
            pc = paired(m, merged, split)
            close = pc is not None and pc.low <= limit <= pc.high  # NaN compares false: not close
            fails = _gate_check(name, m, merged, split, limit_key, limit) is not None
            failing += fails
            failing_close += fails and close
            if close:
                notes.append(f"its {split} change {pc.percent:+.2f}% has the 95% interval [{pc.low:+.2f}, "
                             f"{pc.high:+.2f}], which holds the {limit:g}% limit (evaluate.gate.{limit_key})")
        if notes and failing == failing_close:
            calls[name] = notes
    return calls


ADAPTER_SUFFIX = "+adapter"  # qlora_pipeline.methods.ADAPTER_SUFFIX (this module imports no registry)


def adapter_comparison(artifacts: dict[str, dict]) -> list[dict]:
    """Each artifact with the float adapter unmerged against its merged counterpart: `qlora`
    against `merged`, `<name>+adapter` against `<name>`; the differences in percent."""
    pairs = [("qlora", "merged")] + [(n, n[: -len(ADAPTER_SUFFIX)]) for n in artifacts if n.endswith(ADAPTER_SUFFIX)]
    rows = []
    for unmerged, merged in pairs:
        if unmerged in artifacts and merged in artifacts:
            u, m = artifacts[unmerged], artifacts[merged]
            rows.append({"unmerged": unmerged, "merged": merged, "unmerged_domain_ppl": u["domain_ppl"],
                         "merged_domain_ppl": m["domain_ppl"], "domain_difference": increase(u, m, "domain_ppl"),
                         "general_difference": increase(u, m, "general_ppl"),
                         "unmerged_size_bytes": u["size_bytes"], "merged_size_bytes": m["size_bytes"]})
    return rows


def metrics_path(run_dir: Path) -> Path:
    """Where a run's report keeps its metrics."""
    return run_dir / "report" / rundir.OUTPUT / METRICS_FILE


def gate_failures(run_dir: Path, baselines: bool = False) -> dict[str, list[str]]:
    """The failed artifacts of a finished run's report: those `pipeline run` exits non-zero on,
    or (`baselines`) the failing baseline entries (`quantize[].baseline`), which it only reports."""
    path = metrics_path(run_dir)
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    marked = set(report.get("gate_baselines", []))
    return {name: reasons for name, reasons in report.get("gate", {}).items()
            if reasons and (name in marked) == baselines}


def verdict_label(reasons: list[str], baseline: bool) -> str:
    """'passed', 'failed', or 'failed, a baseline: not counted', as the close calls name them."""
    return "passed" if not reasons else "failed, a baseline: not counted" if baseline else "failed"


def gate_close_calls_of(run_dir: Path) -> dict[str, str]:
    """A finished run's close calls (`gate_close_calls`) as its report recorded them: each
    artifact's verdict (`verdict_label`) and why it is a close call, in one line."""
    path = metrics_path(run_dir)
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    gate, baselines = report.get("gate", {}), set(report.get("gate_baselines", []))
    return {name: f"{verdict_label(gate.get(name, []), name in baselines)}; {'; '.join(notes)}"
            for name, notes in report.get("gate_close_calls", {}).items()}


def gate_cell(reasons: list[str], baseline: bool, bold: bool = True, close_call: bool = False) -> str:
    """An artifact's verdict as the report's (`bold`) and `compare`'s tables show it; a close
    call (`gate_close_calls`) is marked so, whichever way it went."""
    verdict = ("**FAILED**" if bold else "FAILED") if reasons else "passed"
    marks = ["baseline"] * baseline + ["close call"] * close_call
    return f"{verdict} ({', '.join(marks)})" if marks else verdict


def _table(artifacts: dict[str, dict], verdicts: dict[str, list[str]], gate_on: bool,
           baselines: frozenset[str] = frozenset(), close_calls: frozenset[str] = frozenset()) -> list[str]:
    reference, merged = artifacts.get("base"), artifacts.get("merged")

    def delta(m: dict, ref: dict | None, skip: bool) -> str:
        return "–" if skip else change_cell(m, ref)

    def own_delta(m: dict, key: str) -> str:
        inc = increase({"domain_ppl": m[key]}, m, "domain_ppl") if key in m else None
        return "–" if inc is None else f"{inc:+.2f}%"

    kv = [k for k in KV_FP8_COLUMNS if any(k in m for m in artifacts.values())]
    header = ("| artifact | " + " | ".join(h for h, _ in COLUMNS.values()) + " | domain vs base | domain vs merged |"
              + "".join(f" {KV_FP8_COLUMNS[k]} |" for k in kv))
    if gate_on:
        header += " gate |"
    lines = [header, "|---|" + "---|" * (len(COLUMNS) + 2 + len(kv) + gate_on)]
    for name, m in artifacts.items():
        row = (f"| {name} | " + " | ".join(format_cell(k, m.get(k)) for k in COLUMNS)
               + f" | {delta(m, reference, name == 'base')} | {delta(m, merged, name in FIXED)} |"
               + "".join(f" {own_delta(m, k)} |" for k in kv))
        if gate_on:
            row += (" – |" if name not in verdicts
                    else f" {gate_cell(verdicts[name], name in baselines, close_call=name in close_calls)} |")
        lines.append(row)
    return lines


def environment_lines(artifacts: dict[str, dict]) -> list[str]:
    """Where the figures were computed: one line when every artifact was evaluated in the same
    place, else each place with its artifacts and a warning, since the same weights evaluate to
    slightly different perplexities on another processor or library version."""
    places: dict[str, list[str]] = {}
    for name, m in artifacts.items():
        env = m.get("environment")
        places.setdefault(describe(env) if env else "not recorded (evaluated by an earlier version)", []).append(name)
    if len(places) == 1:
        return [f"Evaluations computed on {next(iter(places))}."]
    return (["**Artifacts evaluated in different places**: the same weights give perplexities a few parts in "
             "10,000 apart on another processor or library version, so compare the rows below "
             "across places with that in mind.", ""]
            + [f"- {place}: {', '.join(names)}" for place, names in places.items()])


def _generations(artifacts: dict[str, dict]) -> list[str]:
    prompts = next((m.get("generations") for m in artifacts.values() if m.get("generations")), None)
    if not prompts:
        return []
    lines = ["", "## Generations (greedy)", ""]
    for k, g in enumerate(prompts):
        lines += [f"**Prompt {k + 1}:** `{g['prompt']!s}`", "", "| artifact | completion |", "|---|---|"]
        for name, m in artifacts.items():
            gens = m.get("generations") or []
            text = gens[k]["completion"] if k < len(gens) else "–"
            text = text.replace("|", "\\|").replace("\n", "⏎").strip()
            lines.append(f"| {name} | {text} |")
        lines.append("")
    return lines


def memory_rows(artifacts: dict[str, dict], deploy: dict) -> list[dict]:
    """The memory plan of every artifact whose evaluation recorded its weight bytes and KV shape."""
    rows = []
    for name, m in artifacts.items():
        if "weights_bytes" in m and "kv_shape" in m:
            rows += memory_plan.plan_rows(name, memory_plan.Attention(**m["kv_shape"]), int(m["weights_bytes"]),
                                          deploy["contexts"], deploy["batch_sizes"], deploy["kv_dtypes"],
                                          deploy["gpu_memory_gb"])
    return rows


def _memory_plot(out: Path, rows: list[dict], gpu_memory_gb: float) -> Path:
    """Total memory against context, one panel per batch size: a line per artifact, solid for the
    first KV dtype, dashed for the others; the GPU's memory as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r["batch"] for r in rows))
    kv_dtypes = list(dict.fromkeys(r["kv_dtype"] for r in rows))
    artifacts = list(dict.fromkeys(r["artifact"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4.2), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes[0], batches):
        for i, artifact in enumerate(artifacts):
            for j, kv_dtype in enumerate(kv_dtypes):
                pts = sorted((r["context"], r["total_bytes"] / memory_plan.GIB) for r in rows
                             if r["batch"] == batch and r["artifact"] == artifact and r["kv_dtype"] == kv_dtype)
                ax.plot([c for c, _ in pts], [t for _, t in pts], marker=".", linestyle="-" if j == 0 else "--",
                        color=colors[i % len(colors)], label=f"{artifact} ({kv_dtype} KV)")
        ax.axhline(gpu_memory_gb, color="black", linewidth=1)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"weights + KV cache (GiB); line: {gpu_memory_gb:g} GiB GPU")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Deployment memory against context")
    fig.tight_layout()
    path = out / "memory_vs_context.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(out: Path, artifacts: dict[str, dict], train_log: Path | None, layer_metrics: dict[str, list]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in artifacts.items():
        if "size_bytes" in m and "domain_ppl" in m:
            ax.scatter(m["size_bytes"] / 1e6, m["domain_ppl"], s=30)
            ax.annotate(name, (m["size_bytes"] / 1e6, m["domain_ppl"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel("test-split domain perplexity")
    ax.set_title("Quality against size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(out / "ppl_vs_size.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if train_log is not None and train_log.exists():
        log = json.loads(train_log.read_text())
        history = log.get("history", [])
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
        evals = [h for h in log.get("evals", history) if "eval_loss" in h]
        if evals:
            ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation loss (domain_valid)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("LoRA training")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(out / "train_loss.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if layer_metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, rows in layer_metrics.items():
            key = "output_rel_err" if any(k.endswith(".output_rel_err") for k in rows[0]) else "weight_rel_err"
            ys = [sum(v for k, v in r.items() if k.endswith("." + key)) / max(1, sum(k.endswith("." + key) for k in r))
                  for r in rows]
            ax.plot([r["layer"] for r in rows], ys, marker=".", label=f"{name} ({key.replace('_', ' ')})")
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean relative error of the layer's linears")
        ax.set_title("Per-layer quantization error")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(out / "layer_error.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def run(ctx: StageContext) -> StageResult:
    # The producers' file names, imported here: `compare`, `status` and MLflow's notes import
    # this module for its table and paths and must not load torch with those stage modules.
    from qlora_pipeline.stages.evaluate import METRICS_FILE as EVALUATION_FILE
    from qlora_pipeline.stages.quantize import LAYER_METRICS_FILE
    from qlora_pipeline.stages.train import TRAIN_LOG_FILE

    artifacts, layer_metrics, train_log = {}, {}, None
    for stage, out in ctx.inputs.items():
        if stage.startswith("evaluate-"):
            m = json.loads((out / EVALUATION_FILE).read_text())
            artifacts[m["artifact"]] = m
        elif stage.startswith("quantize-") and (out / LAYER_METRICS_FILE).exists():
            rows = json.loads((out / LAYER_METRICS_FILE).read_text())
            if rows:
                layer_metrics[stage[len("quantize-"):]] = rows
        elif stage == "train":
            train_log = out / TRAIN_LOG_FILE
    leading = FIXED + ("qlora",)
    order = [n for n in leading if n in artifacts] + [n for n in artifacts if n not in leading]
    artifacts = {n: artifacts[n] for n in order}
    gate = ctx.config.get("gate", {})
    gate_on = any(v is not None for v in gate.values())
    verdicts = gate_verdicts(artifacts, gate) if gate_on else {}
    close_calls = gate_close_calls(artifacts, gate) if gate_on else {}
    baselines = frozenset(ctx.config.get("gate_baselines", ())) & set(verdicts)

    any_m = next(iter(artifacts.values()))
    lines = [
        f"# Report: {ctx.run_dir.name}",
        "",
        f"Domain text of the test split (`domain_eval`: documents and paragraphs no stage trained, calibrated or chose on) and general text, non-overlapping windows of {ctx.config['seq_len']} tokens. "
        "Quantized artifacts are evaluated from their packed checkpoints. Throughput is batch 1 on "
        f"{any_m['device']} ({any_m['dtype']}); peak memory is above the process's level before loading.",
        "",
        *_table(artifacts, verdicts, gate_on, baselines, frozenset(close_calls)),
        "",
        f"Evaluated on {any_m['device']} in {any_m['dtype']}; {int(any_m['domain_tokens'])} domain tokens"
        + (f", {int(any_m['general_tokens'])} general tokens." if "general_tokens" in any_m else ".")
        + (" ± after a change: the half-width of its 95% interval, from the per-window differences "
           "(the next section says how); an interval shown by its ends is lopsided." if any("domain_window_nll" in m for m in artifacts.values()) else ""),
        "",
        *environment_lines(artifacts),
    ]
    failed = {n: r for n, r in verdicts.items() if r and n not in baselines}
    failed_baselines = {n: r for n, r in verdicts.items() if r and n in baselines}
    if failed:
        lines += ["", "## Quality gate: failed", ""] + [f"- **{n}**: {'; '.join(r)}" for n, r in failed.items()]
    if failed_baselines:
        lines += ["", "## Quality gate: baselines that fail it", "",
                  "Reference entries (`quantize[].baseline`): judged like the others, not counted against the run.",
                  ""] + [f"- **{n}** (baseline): {'; '.join(r)}" for n, r in failed_baselines.items()]
    if close_calls:
        lines += ["", "## Quality gate: close calls", "",
                  "The gate judges each change's point figure. For these the 95% interval of a change the "
                  "verdict rests on holds the limit, so the verdict is one this evaluation text cannot make "
                  "with confidence: more held-out text could turn it either way. (The interval takes windows "
                  "as independent, a lower bound on the uncertainty: an unmarked verdict near its limit is "
                  "not settled either.)", ""]
        lines += [f"- **{n}** ({verdict_label(verdicts[n], n in baselines)}): {'; '.join(r)}"
                  for n, r in close_calls.items()]
    between = pairwise(artifacts)
    lines += _pairwise_lines(between)
    comparison = adapter_comparison(artifacts)
    if comparison:
        lines += ["", "## Adapter vs merge", "",
                  "The float adapter unmerged on a base against the adapter merged: `qlora` (the NF4 base the "
                  "adapter was trained on + the adapter) against `merged`; `<name>+adapter` (the original base "
                  "quantized with `<name>`'s method, settings and calibration windows + the adapter) against "
                  "`<name>` (the merged model quantized the same way). Difference: the unmerged artifact's "
                  "perplexity over the merged one's, in percent.", "",
                  "| unmerged | merged | domain ppl (unmerged) | domain ppl (merged) | domain difference "
                  "| general difference | size (MB): unmerged / merged |", "|---|---|---|---|---|---|---|"]
        for row in comparison:
            unmerged, merged = artifacts[row["unmerged"]], artifacts[row["merged"]]
            lines.append(f"| {row['unmerged']} | {row['merged']} | {row['unmerged_domain_ppl']:.3f} | "
                         f"{row['merged_domain_ppl']:.3f} | {change_cell(unmerged, merged)} | "
                         f"{change_cell(unmerged, merged, 'general')} | "
                         f"{row['unmerged_size_bytes'] / 1e6:.1f} / {row['merged_size_bytes'] / 1e6:.1f} |")
    deploy = ctx.config["deploy"]
    plan = memory_rows(artifacts, deploy)
    plots = _plots(ctx.output_dir, artifacts, train_log, layer_metrics)
    if plan:
        plots.append(_memory_plot(ctx.output_dir, plan, deploy["gpu_memory_gb"]))
        lines += ["", "## Deployment memory", "",
                  "Weights (the checkpoint's tensor bytes) + KV cache (2 x layers x KV heads x head dim x bytes x "
                  "context x batch) per artifact, against one GPU of "
                  f"{deploy['gpu_memory_gb']:g} GiB (`deploy`); activations, the CUDA context, fragmentation and a "
                  "server's cache block granularity are not counted.", "",
                  *memory_plan.render(plan, deploy["gpu_memory_gb"])]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += _generations(artifacts)
    (ctx.output_dir / REPORT_FILE).write_text("\n".join(lines) + "\n")
    report = {"artifacts": artifacts, "gate": verdicts, "memory_plan": plan, "adapter_vs_merge": comparison,
              "pairwise": between}
    if baselines:
        report["gate_baselines"] = sorted(baselines)
    if gate_on:  # also when empty, so a reader tells "none" from a report made before close calls
        report["gate_close_calls"] = close_calls
    (ctx.output_dir / METRICS_FILE).write_text(json.dumps(report, indent=2))

    flat = {f"{name}.{k}": v for name, m in artifacts.items() for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat.update({f"{name}.gate_passed": float(not reasons) for name, reasons in verdicts.items()})
    flat.update({f"{name}.gate_close_call": float(name in close_calls) for name in verdicts})
    for name, m in artifacts.items():  # each change over the merged model with its 95% interval, in percent
        for split in ("domain", "general"):
            pc = None if name in FIXED else paired(m, artifacts.get("merged"), split)
            if pc is not None:
                flat.update({f"{name}.{split}_vs_merged": pc.percent, f"{name}.{split}_vs_merged_low": pc.low,
                             f"{name}.{split}_vs_merged_high": pc.high})
    for p in [ctx.output_dir / REPORT_FILE, ctx.output_dir / METRICS_FILE, *plots]:
        ctx.metrics.log_artifact(p)
    if failed or failed_baselines or close_calls:
        ctx.metrics.set_tags({f"gate.{n}": gate_cell(verdicts[n], n in baselines, bold=False,
                                                     close_call=n in close_calls).lower()
                              for n in verdicts if verdicts[n] or n in close_calls})
    return StageResult(metrics=flat, info={"gate_failed": sorted(failed)}, parent_metrics=flat)
