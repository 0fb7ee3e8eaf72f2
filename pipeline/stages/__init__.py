"""The stage registry: the graph a recipe asks for, built from data.

Only stages that do their real work are registered. This version has `data`, `base`,
`train` (skipped when `merge.adapter` names an adapter trained elsewhere), `merge`, the
evaluations of base, base-nf4 and merged, `calibrate`, `quantize-<name>` for the methods
`rtn`, `gptq`, `awq` and `awq+gptq` with an evaluation of each, and `report`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.graph import StageSpec
from pipeline.errors import InputError, RecipeError
from pipeline.models import cached_config, source_identity
from pipeline.stages import base, calibrate, data, evaluate, merge, quantize, report, train


def adapter_identity(path: str) -> list[str]:
    """Sizes and mtimes of an external adapter's files: a changed adapter re-runs the merge."""
    root = Path(path).expanduser()
    return [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.iterdir()) if p.is_file()]


def build_stages(recipe) -> list[StageSpec]:
    model = {"model": recipe.model.model_dump(mode="json"), "weights": source_identity(recipe.model)}
    # The gate is the report's business: changing a threshold re-evaluates nothing.
    evaluation = {"seq_len": recipe.data.seq_len, **recipe.evaluate.model_dump(mode="json", exclude={"gate"})}
    specs = [
        StageSpec("data", data.run, (), {**model, "data": recipe.data.model_dump(mode="json")}, data.VERSION),
        StageSpec("base", base.run, (), {**model, "nf4": recipe.nf4.model_dump(mode="json")}, base.VERSION),
        StageSpec("evaluate-base", evaluate.make_stage("base", evaluate.load_original_base), ("data",),
                  {**model, "evaluate": evaluation}, evaluate.VERSION),
        StageSpec("evaluate-base-nf4", evaluate.make_stage("base-nf4", evaluate.load_base_nf4), ("data", "base"),
                  {"evaluate": evaluation}, evaluate.VERSION),
    ]
    merge_config = {"merge": recipe.merge.model_dump(mode="json"), "dtype": recipe.model.dtype}
    if recipe.merge.adapter is None:
        train_config = {"lora": recipe.lora.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json"),
                        "seq_len": recipe.data.seq_len}
        specs.append(StageSpec("train", train.run, ("data", "base"), train_config, train.VERSION, distributed=True))
        merge_deps: tuple[str, ...] = ("data", "base", "train")
    else:
        merge_config["adapter_files"] = adapter_identity(recipe.merge.adapter)
        merge_deps = ("data", "base")
    if recipe.merge.into in ("original", "auto"):
        merge_config["weights"] = model["weights"]
    if recipe.merge.into == "auto":  # the choice is made on the evaluation windows
        merge_config["evaluate"] = evaluation
    specs += [
        StageSpec("merge", merge.run, merge_deps, merge_config, merge.VERSION),
        StageSpec("evaluate-merged", evaluate.make_stage("merged", evaluate.load_merged), ("data", "merge"),
                  {"evaluate": evaluation}, evaluate.VERSION),
    ]
    entries = list(recipe.quantize)
    config = cached_config(recipe.model)
    if config is not None:
        problems = []
        for i, q in enumerate(entries):
            try:
                quantize.check_shapes(q, config, f"quantize.{recipe.quantize.index(q)}")
            except InputError as exc:
                problems.append(str(exc))
        if problems:
            raise RecipeError(problems, source="recipe")
    if any(q.method != "rtn" for q in entries):
        specs.append(StageSpec("calibrate", calibrate.run, ("data",),
                               {"calibration": recipe.calibration.model_dump(mode="json")}, calibrate.VERSION))
    for q in entries:
        deps = ("merge",) if q.method == "rtn" else ("merge", "calibrate")
        specs += [
            StageSpec(f"quantize-{q.name}", quantize.run, deps, {"entry": quantize.relevant_settings(q),
                      "dtype": recipe.model.dtype}, quantize.VERSION),
            StageSpec(f"evaluate-{q.name}", evaluate.make_stage(q.name, evaluate.quantized_loader(q.name)),
                      ("data", f"quantize-{q.name}"), {"evaluate": evaluation}, evaluate.VERSION),
        ]
    # The report reads the evaluations, the training log and the per-layer quantization errors.
    report_deps = tuple(s.name for s in specs if s.name.startswith(("evaluate-", "quantize-")) or s.name == "train")
    specs.append(StageSpec("report", report.run, report_deps,
                           {"gate": recipe.evaluate.gate.model_dump(mode="json")}, report.VERSION))
    return specs
