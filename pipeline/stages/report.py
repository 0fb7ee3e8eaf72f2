"""Stage `report`: one table of every evaluated artifact, as markdown and JSON, logged to MLflow."""
from __future__ import annotations

import json

from pipeline.graph import StageContext, StageResult

VERSION = 1
COLUMNS = (("domain_ppl", "domain ppl", "{:.3f}"), ("general_ppl", "general ppl", "{:.3f}"),
           ("size_bytes", "size (MB)", None), ("quantize_seconds", "quantize (s)", "{:.0f}"),
           ("load_seconds", "load (s)", "{:.1f}"))
FIXED = ("base", "base-nf4", "merged")


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
    reference, merged = artifacts.get("base"), artifacts.get("merged")

    def delta(m: dict, ref: dict | None, skip: bool) -> str:
        return "–" if ref is None or skip else f"{100 * (m['domain_ppl'] / ref['domain_ppl'] - 1):+.2f}%"

    lines = [
        f"# Report: {ctx.run_dir.name}",
        "",
        f"Held-out domain text and general text, non-overlapping windows of {ctx.recipe.data.seq_len} tokens. "
        "Quantized artifacts are evaluated from their packed checkpoints.",
        "",
        "| artifact | " + " | ".join(c[1] for c in COLUMNS) + " | domain vs base | domain vs merged |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    order = [n for n in FIXED if n in artifacts] + [n for n in artifacts if n not in FIXED]
    artifacts = {n: artifacts[n] for n in order}
    for name, m in artifacts.items():
        lines.append(f"| {name} | " + " | ".join(_cell(m, k, f) for k, _, f in COLUMNS)
                     + f" | {delta(m, reference, name == 'base')} | {delta(m, merged, name in FIXED)} |")
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
