"""The stage registry: the graph a recipe asks for, built from data.

Only stages that do their real work are registered. This version has `data`, `base`,
`train` (skipped when `merge.adapter` names an adapter trained elsewhere), `merge`, the
evaluations of base, base-nf4 and merged, and `report`; `calibrate` and `quantize-<name>`
are configured in recipes but not implemented yet (see README).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.graph import StageSpec
from pipeline.models import source_identity
from pipeline.stages import base, data, evaluate, merge, report, train

NOT_YET_IMPLEMENTED = ("calibrate", "quantize-<name>")


def adapter_identity(path: str) -> list[str]:
    """Sizes and mtimes of an external adapter's files: a changed adapter re-runs the merge."""
    root = Path(path).expanduser()
    return [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.iterdir()) if p.is_file()]


def build_stages(recipe) -> list[StageSpec]:
    model = {"model": recipe.model.model_dump(mode="json"), "weights": source_identity(recipe.model)}
    evaluation = {"seq_len": recipe.data.seq_len, **recipe.evaluate.model_dump(mode="json")}
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
    if recipe.merge.into == "original":
        merge_config["weights"] = model["weights"]
    specs += [
        StageSpec("merge", merge.run, merge_deps, merge_config, merge.VERSION),
        StageSpec("evaluate-merged", evaluate.make_stage("merged", evaluate.load_merged), ("data", "merge"),
                  {"evaluate": evaluation}, evaluate.VERSION),
    ]
    evaluations = tuple(s.name for s in specs if s.name.startswith("evaluate-"))
    specs.append(StageSpec("report", report.run, evaluations, {}, report.VERSION))
    return specs
