"""Stage specifications and the stage graph: what runs, in which order, fingerprinted how."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
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
        recipe: the whole validated recipe (read-only).
        inputs: upstream stage name -> its published `output/` directory.
        output_dir: where to write the artifact (published atomically when the stage returns).
        checkpoint_dir: intra-stage progress that survives a crash; wiped when the fingerprint changes.
        metrics: the stage's MLflow logger (never raises).
        progress: tqdm-like factory for loops (`progress(iterable, desc=..., total=...)`).
    """

    name: str
    config: dict
    recipe: Any
    inputs: dict[str, Path]
    output_dir: Path
    checkpoint_dir: Path
    metrics: MetricLogger
    progress: Callable[..., Any]
    run_dir: Path


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
        version: bumped when the stage's code changes what it produces.
        distributed: every rank of a multi-process launch runs it (training); other stages
            run on the main process while the rest wait.
    """

    name: str
    fn: Callable[[StageContext], StageResult]
    deps: tuple[str, ...]
    config: dict
    version: int
    distributed: bool = False


def fingerprint(spec: StageSpec, dep_fingerprints: dict[str, str]) -> str:
    payload = {
        "stage": spec.name,
        "version": spec.version,
        "config": spec.config,
        "inputs": {k: dep_fingerprints[k] for k in sorted(spec.deps)},
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
