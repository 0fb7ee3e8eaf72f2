"""Stage specifications and the stage graph: what runs, in which order, fingerprinted how."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


@dataclass
class StageContext:
    """What a stage function receives.

    Attributes:
        name: the stage name, e.g. "evaluate-base-nf4".
        config: the stage's own settings (the normalized recipe slice its fingerprint covers).
        inputs: upstream stage name -> its published `output/` directory.
        output_dir: where to write the artifact (published atomically when the stage returns).
        checkpoint_dir: intra-stage progress that survives a crash; wiped when the fingerprint changes.
        metrics: the stage's MLflow logger (never raises).
        progress: tqdm-like factory for loops (`progress(iterable, desc=..., total=...)`).
        runtime: settings that change how the stage computes, not what (`StageSpec.runtime`).
    """

    name: str
    config: dict
    inputs: dict[str, Path]
    output_dir: Path
    checkpoint_dir: Path
    metrics: MetricLogger
    progress: Callable[..., Any]
    run_dir: Path
    runtime: dict = field(default_factory=dict)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # Also logged on the pipeline's parent run (the report's summary: one row per run in
    # MLflow's compare view).
    parent_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageSpec:
    """One node of the graph.

    Attributes:
        name: unique stage name (its folder in the run directory).
        fn: `(StageContext) -> StageResult`.
        deps: upstream stage names; their outputs become `ctx.inputs`.
        config: the settings that define this stage's result (part of the fingerprint).
        distributed: every rank of a multi-process launch runs it (training); other stages
            run on the main process while the rest wait.
        code: modules the stage imports by name at run time (a quantization method's
            implementation and format, from the registry): their code is part of the stage's,
            as that of the modules its function's module imports.
        cacheable: its output may be stored in and taken from the stage cache; False for a
            stage whose output depends on something its fingerprint does not cover (the
            report names its run directory).
        runtime: settings that change how the stage computes but not its output (where the
            layer engine keeps its activations), so not part of the fingerprint: changing one
            re-runs nothing. A test must show the output's bytes do not depend on each.
        names_run_dir: its output holds its run directory's name (the report's title); the
            runner adds the name to its settings (`RUN_DIR_NAME`), so a copied or renamed run
            directory re-runs it instead of calling the old name up to date.
    """

    name: str
    fn: Callable[[StageContext], StageResult]
    deps: tuple[str, ...]
    config: dict
    distributed: bool = False
    code: tuple[str, ...] = ()
    cacheable: bool = True
    runtime: dict = field(default_factory=dict)
    names_run_dir: bool = False

    @property
    def module(self) -> str:
        """The module that defines the stage's function (what `codehash.code_files` hashes),
        known without importing it when `fn` is a `StageRef`."""
        return getattr(self.fn, "__module__", None) or ""


class StageRef:
    """A stage function named by its module, imported on first call.

    Building the stage graph (`validate`, `plan`, `status`) then imports no stage module (they
    import torch and transformers). The function is the module's `run`, or what the module's
    function `factory` returns for `args` (plain data: `evaluation_stage("merged",
    "load_merged")`). `__module__` is the module's name, so `codehash.code_files` hashes its
    source exactly as it would the function's; `call` spells the factory call, which is part
    of the stage's code too (the registry, not the module, chooses it), so the runner puts it
    into the fingerprint: naming another loader or artifact makes the stage stale.
    """

    def __init__(self, module: str, factory: Optional[str] = None, args: tuple = ()):
        self.__module__ = module
        self.factory = factory
        self.args = tuple(args)
        self._fn: Optional[Callable[[StageContext], StageResult]] = None

    @property
    def call(self) -> Optional[str]:
        """`factory(args...)` as written, or None for the module's `run`."""
        if self.factory is None:
            return None
        return f"{self.factory}({', '.join(map(repr, self.args))})"

    def resolve(self) -> Callable[[StageContext], StageResult]:
        if self._fn is None:
            import importlib

            mod = importlib.import_module(self.__module__)
            self._fn = getattr(mod, self.factory)(*self.args) if self.factory is not None else mod.run
        return self._fn

    def __call__(self, ctx: StageContext) -> StageResult:
        return self.resolve()(ctx)

    def __repr__(self) -> str:
        return f"StageRef({self.__module__!r}{', ' + self.call if self.call else ''})"


def output_digest(files: dict[str, dict]) -> str:
    """The content of a published output, from its manifest's file table: one hash over
    every file's relative path and sha256. Equal bytes give an equal digest, whenever and
    however often the stage ran."""
    table = {rel: meta["sha256"] for rel, meta in sorted(files.items())}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:20]


RUN_DIR_NAME = "run_dir_name"  # the setting a `names_run_dir` stage gets from the runner


def with_run_dir_name(spec: StageSpec, run_dir: Path) -> StageSpec:
    """`spec` as it runs in `run_dir`: with the directory's name among its settings when its
    output holds that name (`StageSpec.names_run_dir`), unchanged otherwise."""
    if not spec.names_run_dir:
        return spec
    return replace(spec, config={**spec.config, RUN_DIR_NAME: Path(run_dir).name})


def fingerprint(spec: StageSpec, code: dict[str, str], input_digests: dict[str, str]) -> str:
    """What defines a stage's result: its settings, the code it runs (`codehash.code_files`)
    and the content of its inputs (`output_digest` of each upstream output)."""
    payload = {
        "stage": spec.name,
        "config": spec.config,
        "code": code,
        "inputs": {k: input_digests[k] for k in sorted(spec.deps)},
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def topological(specs: list[StageSpec]) -> list[StageSpec]:
    by_name = {s.name: s for s in specs}
    order: list[StageSpec] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise ValueError(f"stage graph has a cycle: {' -> '.join(stack + (name,))}")
        for dep in by_name[name].deps:
            if dep not in by_name:
                raise ValueError(f"stage {name} depends on unknown stage {dep}")
            visit(dep, stack + (name,))
        seen.add(name)
        order.append(by_name[name])

    for s in specs:
        visit(s.name, ())
    return order


def downstream_of(specs: list[StageSpec], root: str) -> set[str]:
    """`root` and every stage that depends on it, directly or not."""
    out = {root}
    changed = True
    while changed:
        changed = False
        for s in specs:
            if s.name not in out and out.intersection(s.deps):
                out.add(s.name)
                changed = True
    return out
