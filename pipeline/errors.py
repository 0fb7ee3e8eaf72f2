"""Typed errors. The CLI maps `InputError` (and subclasses) to exit code 2, `StageError` to 1."""
from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: recipe, paths, data. Exit code 2, no traceback."""


class RecipeError(InputError):
    """One or more recipe problems; `problems` holds one line per problem, each naming its key path."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        head = f"{self.source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


class DataError(InputError):
    """A data source that cannot be read or yields too little text."""


class RunLockedError(InputError):
    """Another live process is running stages in the same run directory."""


class StageError(Exception):
    """A stage failed while doing its work (exit code 1)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `docker stop`, `kill`) during `pipeline run`: it stops
    the run as Ctrl-C does, so the interrupted stage is recorded as such, its lock and
    temporary files go, and the next run resumes."""


def interruption(exc: BaseException) -> str:
    """What stopped a run, for its records and messages: Ctrl-C or SIGTERM."""
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"

