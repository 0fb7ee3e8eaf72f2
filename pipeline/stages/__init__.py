"""The stage registry: the graph a recipe asks for, built from data.

Only stages that do their real work are registered. This version has `data`, `base`,
`evaluate-base`, `evaluate-base-nf4` and `report`; `train`, `merge`, `calibrate` and
`quantize-<name>` are configured in recipes but not implemented yet (see README).
"""
from __future__ import annotations

from pipeline.graph import StageSpec
from pipeline.models import source_identity
from pipeline.stages import base, data, evaluate, report

NOT_YET_IMPLEMENTED = ("train", "merge", "calibrate", "quantize-<name>")


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
    evaluations = tuple(s.name for s in specs if s.name.startswith("evaluate-"))
    specs.append(StageSpec("report", report.run, evaluations, {}, report.VERSION))
    return specs
