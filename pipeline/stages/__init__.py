"""The stage registry: the graph a recipe asks for, built from data.

Only stages that do their real work are registered. This version has `data`, `base`,
`train` (skipped when `merge.adapter` names an adapter trained elsewhere), `merge`, the
evaluations of base, base-nf4 and merged, `calibrate` and/or `calibrate-general` (the
calibration windows of the entries calibrated on the domain / general train split),
`awq-search-w<bits>g<group>[-general]` (one per distinct AWQ search, shared by the `awq` and
`awq+gptq` entries it serves),
`quantize-<name>` for each entry (methods: `qlora_pipeline.methods`: `rtn`, `gptq`, `awq`,
`awq+gptq`, `nf4`, `int8`) with an evaluation of each, and `report`. With `evaluate.qlora`, `evaluate-qlora` (the
NF4 base + the float adapter, unmerged); for an entry with `adapter_on_quantized_base`,
`quantize-<name>+adapter` (the original base quantized the same way; its AWQ search, if any,
`awq-search-...-base`) and `evaluate-<name>+adapter` (with the float adapter on top).

The registry imports no stage module: each stage function is a `StageRef` naming its module,
imported when the stage runs. `validate`, `plan` and `status` build the graph without
importing torch, transformers or peft; `codehash` reads the stage modules' source with `ast`.
"""
from __future__ import annotations

from pathlib import Path

from qlora_pipeline.graph import StageRef, StageSpec
from qlora_pipeline.errors import InputError, RecipeError
from qlora_pipeline.models import MODEL_SOURCE, cached_config, fingerprinted_model, source_identity
from qlora_pipeline import methods
from qlora_pipeline.data_identity import content_identity
from qlora_pipeline.devices import resolve_device
from qlora_pipeline.dtypes import resolve_dtype_name, train_dtype_name
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.recipe import TRAIN_CHECKPOINTING

_EVALUATE = "qlora_pipeline.stages.evaluate"


def _stage(name: str) -> StageRef:
    """The `run` function of stage module `pipeline.stages.<name>`, imported when called."""
    return StageRef(f"qlora_pipeline.stages.{name}")


def _evaluation(artifact: str, loader: str) -> StageRef:
    """The evaluation of `artifact`, loaded by `evaluate.<loader>`."""
    return StageRef(_EVALUATE, "evaluation_stage", (artifact, loader))


def _quantized_evaluation(name: str, with_adapter: bool = False) -> StageRef:
    return StageRef(_EVALUATE, "quantized_evaluation_stage", (name, with_adapter))


def adapter_identity(path: str) -> dict[str, str]:
    """The content (sha256, `file_hashes`) of an external adapter's files: a changed adapter
    re-runs the merge, whatever its size and mtime say."""
    from qlora_pipeline.file_hashes import sha256_files

    root = Path(path).expanduser()
    return {p.name: digest for p, digest in sha256_files(sorted(p for p in root.iterdir() if p.is_file())).items()}


def _publishes_layers(entries, search_names: dict[str, str], search: str) -> dict:
    """`{"publish_layers": True}` when an `awq` entry applies `search`: the search stage quantizes
    as `awq` does, so it hands over its layers and that entry only assembles them. Absent
    otherwise: a search only `awq+gptq` entries apply publishes nothing (GPTQ quantizes anew)."""
    if any(search_names.get(q.name) == search and methods.METHODS[q.method].assembles_search_layers for q in entries):
        return {"publish_layers": True}
    return {}


def _shared_storage(entries, search_names: dict[str, str], search: str) -> str:
    """Where a shared search keeps its activations: the storage its entries agree on, else auto."""
    storages = {q.activations.storage for q in entries if search_names.get(q.name) == search}
    return storages.pop() if len(storages) == 1 else "auto"


def context_problems(recipe, config: dict) -> list[str]:
    """A window longer than the model's context (`max_position_embeddings`, which a rope-scaled
    config already states at its extended length): positions the model never saw would make
    its perplexities, training and calibration statistics meaningless, or fail minutes into a
    run."""
    context = config.get("max_position_embeddings")
    if not isinstance(context, int):
        return []
    windows = {"data.seq_len": recipe.data.seq_len, "train.seq_len": recipe.train.seq_len,
               "calibration.seq_len": recipe.calibration.seq_len}
    return [f"{key}: {n} tokens is longer than the model's context of {context} (max_position_embeddings); "
            f"give at most {context}" for key, n in windows.items() if n is not None and n > context]


def lora_target_problems(recipe, config: dict) -> list[str]:
    """`lora.target_modules` naming no linear of the model: peft refuses them only when the
    train stage starts, after data and base ran. An entry matches a module whose full name is
    it or ends with '.' + it (peft's rule for a list), e.g. q_proj or mlp.down_proj."""
    targets = recipe.lora.target_modules
    if recipe.merge.adapter is not None or targets == "all-linear" or "num_hidden_layers" not in config:
        return []
    try:
        names = [name for name, _ in family_for(config.get("model_type", "?")).linear_names(config)]
    except (InputError, TypeError, ValueError):
        return []  # an unsupported or damaged config: preflight names it
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not unknown:
        return []
    known = sorted({n.rsplit(".", 1)[-1] for n in names})
    return [f"lora.target_modules: {', '.join(map(repr, unknown))} match{'es' if len(unknown) == 1 else ''} no linear "
            f"of the model; its linears: {', '.join(known)} (or all-linear)"]


def build_stages(recipe) -> list[StageSpec]:
    # A local model by its files' content, not its path (`fingerprinted_model`): moved or copied,
    # it is the same model; the stages that read it get the path as a runtime setting (below).
    model = {"model": fingerprinted_model(recipe.model), "weights": source_identity(recipe.model)}
    # The gate is the report's business: changing a threshold re-evaluates nothing.
    # Nor does `evaluate.qlora`, which adds an evaluation and changes none.
    # `auto` dtypes resolved here (torch-free), as the devices are: bf16 compute on one machine
    # is not float32 on another, so the resolved dtype is part of the fingerprint. So is the
    # resolved device, as for the quantize stages: an evaluation measures speed, peak memory and
    # perplexity on it, and one made on a GPU must not stand for a CPU run's (the stage cache).
    # The stage computes with the resolved pair, so `device: cpu` where `auto` is the CPU is the
    # same evaluation, not a new one.
    eval_device = resolve_device(recipe.evaluate.device)
    eval_dtype = resolve_dtype_name(recipe.evaluate.dtype, eval_device)
    evaluation = {"seq_len": recipe.data.seq_len,
                  **recipe.evaluate.model_dump(mode="json", exclude={"gate", "qlora"}),
                  "device": eval_device, "dtype": eval_dtype}
    scoring = {"evaluate": evaluation}
    # Each entry with its calibration source resolved (the recipe's default filled in; None for
    # methods that take no calibration): part of its quantize (and search) stage's settings.
    entries = [q.model_copy(update={"calibration_source": recipe.calibration_source(q)}) for q in recipe.quantize]
    sources = sorted({q.calibration_source for q in entries if q.calibration_source is not None})
    # The general train split is prepared only when something calibrates on it: only then is its
    # size part of the data stage's settings.
    # The tokens depend on the tokenizer, not on the dtype the weights load in.
    data_config = {"model": {k: v for k, v in model["model"].items() if k != "dtype"}, "weights": model["weights"],
                   "data": recipe.data.model_dump(mode="json", exclude={"general_train_tokens"})}
    for source in ("domain", "general"):  # unset, as before the setting existed: the same work keeps its fingerprint
        if (data_config["data"].get(source) or {}).get("document_chars", 0) is None:
            del data_config["data"][source]["document_chars"]
    # The text itself, not only where it is: a corpus edited in place re-runs `data` (and, if its
    # tokens change, everything after it), and the stage cache never serves another text's tokens.
    data_config["content"] = {key: content_identity(source) for key, source in
                              (("domain", recipe.data.domain), ("general", recipe.data.general)) if source is not None}
    if "general" in sources:
        data_config["general_train_tokens"] = recipe.data.general_train_tokens
    specs = [
        StageSpec("data", _stage("data"), (), data_config),
        StageSpec("base", _stage("base"), (), {**model, "nf4": recipe.nf4.model_dump(mode="json")}),
        StageSpec("evaluate-base", _evaluation("base", "load_original_base"), ("data",),
                  {**model, **scoring}),
        StageSpec("evaluate-base-nf4", _evaluation("base-nf4", "load_base_nf4"), ("data", "base"),
                  dict(scoring)),
    ]
    # The merge verifies itself on validation windows of up to data.seq_len tokens.
    merge_config = {"merge": recipe.merge.model_dump(mode="json"), "dtype": recipe.model.dtype,
                    "seq_len": recipe.data.seq_len}
    if recipe.merge.adapter is None:
        # The adapter names its base model; NF4's compute dtype is the default training dtype on CUDA.
        # How often it checkpoints, and how many it keeps: runtime settings (`TRAIN_CHECKPOINTING`),
        # so changing them re-trains nothing.
        train_config = {"lora": recipe.lora.model_dump(mode="json"),
                        "train": recipe.train.model_dump(mode="json", exclude=set(TRAIN_CHECKPOINTING)),
                        "seq_len": recipe.data.seq_len, "model": model["model"],
                        "nf4_compute_dtype": recipe.nf4.compute_dtype,
                        "compute_dtype": train_dtype_name(recipe.train.dtype, resolve_device("auto"),
                                                          cuda_dtype=recipe.nf4.compute_dtype)}
        specs.append(StageSpec("train", _stage("train"), ("data", "base"), train_config, distributed=True,
                               runtime={k: getattr(recipe.train, k) for k in TRAIN_CHECKPOINTING}))
        merge_deps: tuple[str, ...] = ("data", "base", "train")
    else:
        merge_config["adapter_files"] = adapter_identity(recipe.merge.adapter)
        merge_deps = ("data", "base")
    # Where the float adapter comes from, for the evaluations that put it on a base unmerged.
    adapter_deps = ("train",) if recipe.merge.adapter is None else ()
    adapter_config = {} if recipe.merge.adapter is None else {
        "adapter": recipe.merge.adapter, "adapter_files": merge_config["adapter_files"]}
    if recipe.merge.into in ("original", "auto"):
        merge_config.update(model)
    if recipe.merge.into == "auto":  # the choice is made on validation windows with these settings
        merge_config.update(scoring)
    specs += [
        StageSpec("merge", _stage("merge"), merge_deps, merge_config),
        StageSpec("evaluate-merged", _evaluation("merged", "load_merged"), ("data", "merge"),
                  dict(scoring)),
    ]
    if recipe.evaluate.qlora:  # the model as trained: NF4 base + the float adapter, unmerged
        specs.append(StageSpec("evaluate-qlora", _evaluation("qlora", "load_qlora"), ("data", "base") + adapter_deps,
                               {**scoring, **adapter_config}))
    config = cached_config(recipe.model)
    if config is not None:
        problems = context_problems(recipe, config) + lora_target_problems(recipe, config)
        for i, q in enumerate(entries):
            try:
                methods.check_shapes(q, config, f"quantize.{i}")
            except InputError as exc:
                problems.append(str(exc))
        if problems:
            raise RecipeError(problems, source="recipe")
    onto_base = [q for q in entries if q.adapter_on_quantized_base]
    if onto_base and config is not None and "quantization_config" in config:
        i = next(i for i, q in enumerate(recipe.quantize) if q.adapter_on_quantized_base)
        raise RecipeError([f"quantize.{i}.adapter_on_quantized_base: model.source is already quantized "
                           f"({config['quantization_config'].get('quant_method', 'quantization_config')}); there "
                           "are no original float weights to quantize"], source="recipe")
    for source in sources:  # `calibrate` (domain train split), `calibrate-general` (general train split)
        specs.append(StageSpec(methods.calibration_stage_name(source), _stage("calibrate"), ("data",),
                               {"calibration": {**recipe.calibration.model_dump(mode="json"), "source": source}}))
    search_names = methods.search_stage_names(entries)  # entry -> the search stage it applies
    searches: dict[str, dict] = {}  # search stage -> its settings
    engines: dict[str, dict] = {}    # search stage -> the device and dtypes it computes with
    for q in entries:
        if q.name in search_names:
            searches[search_names[q.name]] = methods.search_settings(q)
            engines[search_names[q.name]] = methods.engine_settings(q)
    # The device each quantize/search stage computes on, resolved here (torch-free): float math on
    # a GPU differs from the CPU's, so the device is part of the fingerprint, as written "auto" is not.
    specs += [StageSpec(name, _stage("awq_search"),
                        ("merge", methods.calibration_stage_name(settings["calibration_source"])),
                        {"search": settings, "dtype": recipe.model.dtype,
                         "device": resolve_device(engines[name]["device"]),
                         "compute_dtype": engines[name]["compute_dtype"],
                         "activations_dtype": engines[name]["activations_dtype"],
                         **_publishes_layers(entries, search_names, name)},
                        runtime={"activations_storage": _shared_storage(entries, search_names, name)},
                        code=methods.METHODS["awq"].code_modules())  # the search quantizes as awq does
              for name, settings in searches.items()]
    # The same searches of the original base, for the entries quantizing it (`<name>+adapter`).
    base_search_names = methods.search_stage_names(onto_base, onto_base=True)
    base_searches = {base_search_names[q.name]: (methods.search_settings(q), q)
                     for q in onto_base if q.name in base_search_names}
    specs += [StageSpec(name, _stage("awq_search"), (methods.calibration_stage_name(settings["calibration_source"]),),
                        {"search": settings, "dtype": recipe.model.dtype, **model,
                         "device": resolve_device(q.device), "compute_dtype": q.compute_dtype,
                         "activations_dtype": q.activations.dtype,
                         **_publishes_layers(onto_base, base_search_names, name)},
                        runtime={"activations_storage": q.activations.storage},
                        code=methods.METHODS["awq"].code_modules())
              for name, (settings, q) in base_searches.items()]
    for q in entries:
        deps = ("merge", methods.calibration_stage_name(q.calibration_source)) if q.calibration_source else ("merge",)
        if q.name in search_names:
            deps += (search_names[q.name],)
        specs += [
            StageSpec(f"quantize-{q.name}", _stage("quantize"), deps, {"entry": methods.relevant_settings(q),
                      "dtype": recipe.model.dtype, "device": resolve_device(q.device)},
                      runtime={"activations_storage": q.activations.storage},
                      code=methods.METHODS[q.method].code_modules()),
            StageSpec(f"evaluate-{q.name}", _quantized_evaluation(q.name),
                      ("data", f"quantize-{q.name}"), dict(scoring),
                      code=(methods.METHODS[q.method].loader_module(),)),
        ]
        if q.adapter_on_quantized_base:
            # The original base (model identity instead of the merge) quantized with the same method,
            # settings and calibration windows; evaluated with the float adapter on top, unmerged.
            name = f"{q.name}{methods.ADAPTER_SUFFIX}"
            base_deps = tuple(d for d in deps if d != "merge" and "search" not in d)
            if q.name in base_search_names:
                base_deps += (base_search_names[q.name],)
            specs += [
                StageSpec(f"quantize-{name}", _stage("quantize"), base_deps,
                          {"entry": methods.relevant_settings(q), "dtype": recipe.model.dtype, **model,
                           "device": resolve_device(q.device)},
                          runtime={"activations_storage": q.activations.storage},
                          code=methods.METHODS[q.method].code_modules()),
                StageSpec(f"evaluate-{name}", _quantized_evaluation(name, with_adapter=True),
                          ("data", f"quantize-{name}") + adapter_deps, {**scoring, **adapter_config},
                          code=(methods.METHODS[q.method].loader_module(),)),
            ]
    # The report reads the evaluations, the training log and the per-layer quantization errors.
    report_deps = tuple(s.name for s in specs if s.name.startswith(("evaluate-", "quantize-")) or s.name == "train")
    # Titled with its run directory's name: the runner adds the name to its settings
    # (`names_run_dir`), and a stage cache entry, used in any run directory, would carry another's.
    report_config = {"gate": recipe.evaluate.gate.model_dump(mode="json"), "seq_len": recipe.data.seq_len,
                     "deploy": recipe.deploy.model_dump(mode="json")}
    baselines = [q.name for q in entries if q.baseline]
    baselines += [f"{q.name}{methods.ADAPTER_SUFFIX}" for q in onto_base if q.baseline]
    if baselines:  # absent, as before the setting existed: a recipe without baselines keeps its fingerprint
        report_config["gate_baselines"] = sorted(baselines)
    specs.append(StageSpec("report", _stage("report"), report_deps, report_config, cacheable=False,
                           names_run_dir=True))
    for spec in specs:  # where the model is now, for the stages that read it (not fingerprinted)
        if "model" in spec.config:
            spec.runtime = {**spec.runtime, MODEL_SOURCE: recipe.model.source}
    return specs
