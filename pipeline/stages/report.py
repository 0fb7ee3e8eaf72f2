"""Stage `report`: one table of every evaluated artifact, as markdown and JSON, logged to MLflow."""
from __future__ import annotations

import json

from pipeline.graph import StageContext, StageResult

VERSION = 1
COLUMNS = (("domain_ppl", "domain ppl", "{:.3f}"), ("general_ppl", "general ppl", "{:.3f}"),
           ("size_bytes", "size (MB)", None), ("load_seconds", "load (s)", "{:.1f}"))


def _cell(metrics: dict, key: str, fmt) -> str:
    if key not in metrics:
        return "–"
    if key == "size_bytes":
        return f"{metrics[key] / 1e6:.1f}"
    return fmt.format(metrics[key])


def run(ctx: StageContext) -> StageResult:
    artifacts = {}
    for stage, out in ctx.inputs.items():
        m = json.loads((out / "metrics.json").read_text())
        artifacts[m["artifact"]] = m
    reference = artifacts.get("base")
    lines = [
        f"# Report: {ctx.run_dir.name}",
        "",
        f"Held-out domain text and general text, non-overlapping windows of {ctx.recipe.data.seq_len} tokens.",
        "",
        "| artifact | " + " | ".join(c[1] for c in COLUMNS) + " | domain ppl vs base |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, m in artifacts.items():
        delta = "–"
        if reference and name != "base":
            delta = f"{100 * (m['domain_ppl'] / reference['domain_ppl'] - 1):+.2f}%"
        lines.append(f"| {name} | " + " | ".join(_cell(m, k, f) for k, _, f in COLUMNS) + f" | {delta} |")
    any_m = next(iter(artifacts.values()))
    lines += ["", f"Evaluated on {any_m['device']} in {any_m['dtype']}; "
              f"{int(any_m['domain_tokens'])} domain tokens"
              + (f", {int(any_m['general_tokens'])} general tokens." if "general_tokens" in any_m else ".")]
    (ctx.output_dir / "report.md").write_text("\n".join(lines) + "\n")
    (ctx.output_dir / "metrics.json").write_text(json.dumps({"artifacts": artifacts}, indent=2))
    flat = {f"{name}.{k}": v for name, m in artifacts.items() for k, v in m.items() if isinstance(v, (int, float))}
    ctx.metrics.log_artifact(ctx.output_dir / "report.md")
    ctx.metrics.log_artifact(ctx.output_dir / "metrics.json")
    return StageResult(metrics=flat)
