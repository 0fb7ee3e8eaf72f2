"""The project code a stage runs, and a hash of it that only changes when the code does.

A stage's code is the module that defines its function plus every project module that module
imports, transitively (imports inside functions included). Each file is hashed through `ast`,
with docstrings removed: comments, docstrings and formatting do not count, any change to
what the code does does. The stage runner puts the per-file hashes into the stage's
fingerprint and manifest, so a changed file makes exactly the stages that run it stale and
`plan` can name it.

The third-party libraries that shape what a stage computes (`OUTPUT_LIBRARIES`: torch,
transformers and its tokenizers, peft, ...) count too when the stage's files import them:
`library_versions` gives their installed versions, which the runner adds to the code it
fingerprints, so upgrading torch re-runs the stages that compute with it and `plan` says so.

Only the modules an import statement names are followed (`from qlora_pipeline.stages import merge`
follows `pipeline/stages/merge.py`, not the package's `__init__.py`, which imports every
stage); a package `__init__.py` counts when names are imported from the package itself.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Optional, Union

# Import name -> folder, as pyproject.toml's package-dir installs them (a test checks they agree).
PACKAGE_FOLDERS = {"qlora_pipeline": "pipeline", "qlora_quant": "quant", "qlora_kernels": "qlora_kernels"}
# The stage framework itself: how stages are described and which errors they raise, not
# what any stage computes. Changing them re-runs nothing.
FRAMEWORK_MODULES = frozenset({"qlora_pipeline.graph", "qlora_pipeline.errors"})
# Stage modules. One stage may import another's file-name constants (a test checks that it
# imports nothing else); what it reads from that stage is its output, fingerprinted as an
# input, so the other stage's code is not part of its own.
STAGE_PACKAGE = "qlora_pipeline.stages."

ROOT = Path(__file__).resolve().parent.parent  # the folder holding the project's packages

# Import name -> the distributions whose installed version is part of the code of a stage
# that imports it: the libraries whose behaviour changes a stage's output bytes. transformers
# brings tokenizers, which does the data stage's tokenizing. Left out on purpose: tracking
# (mlflow), progress bars, recipe parsing (pydantic, yaml: the parsed settings are
# fingerprinted themselves) and the standard library.
OUTPUT_LIBRARIES = {
    "torch": ("torch",),
    "transformers": ("transformers", "tokenizers"),
    "tokenizers": ("tokenizers",),
    "safetensors": ("safetensors",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "numpy": ("numpy",),
    "datasets": ("datasets",),
    "datasketch": ("datasketch",),
    "triton": ("triton",),
    "bitsandbytes": ("bitsandbytes",),
    "matplotlib": ("matplotlib",),
}
# The other runtime dependencies (pyproject.toml), each with why its version cannot change a
# stage's output bytes. A test checks that every dependency is in exactly one of the two
# tables, so a new one must be classified before it lands.
NO_OUTPUT_LIBRARIES = {
    "mlflow": "tracking: records what the stages did",
    "huggingface_hub": "downloads; a hub model or dataset is named by commit in the fingerprints",
    "gguf": "read by transformers once, converting a GGUF into a cached folder keyed by its content and "
            "models.CONVERTER_VERSION",
    "pydantic": "recipe parsing: the parsed settings are fingerprinted themselves",
    "pyyaml": "recipe parsing, as pydantic",
    "click": "the command line",
    "tqdm": "progress bars",
}
LIBRARY_KEY = "library "  # key prefix of a library in a stage's code table: "library torch"
# Key of a stage's factory call in its code table (`graph.StageRef.call`): which function of
# its module builds the stage, and with what, is the registry's code, not the module's.
STAGE_CALL_KEY = "stage function"


@lru_cache(maxsize=None)
def package_dir(top: str) -> Optional[Path]:
    """Where project package `top` is imported from: its folder in the source tree (an editable
    install, `pip install -e .`), or the installed one in site-packages (`pip install .`), whose
    folder is named as the package, not as in the source tree (`qlora_pipeline`, not `pipeline`)."""
    spec = importlib.util.find_spec(top)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]).resolve() if locations else None


def module_path(name: str) -> Optional[Path]:
    """The source file of project module `name` (a package's `__init__.py`), or None."""
    top, *rest = name.split(".")
    if top not in PACKAGE_FOLDERS or package_dir(top) is None:
        return None
    base = package_dir(top).joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int, size: int) -> tuple[str, ast.Module]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    digest = hashlib.sha256(ast.dump(_strip_docstrings(ast.parse(source)), include_attributes=False).encode())
    return digest.hexdigest()[:16], tree


def file_hash(path: Path) -> str:
    """Hash of a Python file's syntax tree without docstrings (comments never reach the tree)."""
    st = path.stat()
    return _parse(path, st.st_mtime_ns, st.st_size)[0]


def _imports(path: Path, module: str) -> frozenset[str]:
    """Project modules named by the import statements of `path` (module name `module`)."""
    st = path.stat()
    return _imports_of(path, st.st_mtime_ns, st.st_size, module)


@lru_cache(maxsize=None)
def _imports_of(path: Path, mtime_ns: int, size: int, module: str) -> frozenset[str]:
    """`_imports`, once per file version: a plan asks for the same files once per stage."""
    tree = _parse(path, mtime_ns, size)[1]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - node.level + 1] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            submodules = [f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}")]
            found.update(submodules)
            if len(submodules) < len(node.names):  # some names are attributes of `base` itself
                found.add(base)
    return frozenset(m for m in found if module_path(m) is not None)


def _third_party(path: Path) -> frozenset[str]:
    """Top-level names of the `OUTPUT_LIBRARIES` that `path`'s import statements name."""
    st = path.stat()
    return _third_party_of(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=None)
def _third_party_of(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    tree = _parse(path, mtime_ns, size)[1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return frozenset(found & OUTPUT_LIBRARIES.keys())


@lru_cache(maxsize=None)
def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _relative(path: Path) -> str:
    """A project file as the code tables name it, by its source-tree path (`quant/gptq.py`)
    however the package is installed, so that fingerprints and the stage cache agree between
    an editable and a regular install of the same code."""
    for top, folder in PACKAGE_FOLDERS.items():
        base = package_dir(top)
        if base is not None and path.is_relative_to(base):
            return (Path(folder) / path.relative_to(base)).as_posix()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _code_paths(fn: Union[Callable, str]) -> list[tuple[str, Path]]:
    """(module name, source file) of every file of the code stage function `fn` runs, the
    framework modules included (`code_files` leaves them out)."""
    module = fn if isinstance(fn, str) else (getattr(fn, "__module__", None) or "")
    start = module_path(module)
    if start is None:  # a stage defined outside the project packages (tests, plugins)
        if isinstance(fn, str):
            return []
        source = inspect.getsourcefile(fn)
        if source is None:
            return []
        start = Path(source).resolve()
    out: list[tuple[str, Path]] = []
    todo = [(module, start)]
    seen: set[Path] = set()
    while todo:
        name, path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        out.append((name, path))
        for imported in _imports(path, name):
            if imported.startswith(STAGE_PACKAGE) and imported != module:
                continue
            todo.append((imported, module_path(imported)))
    return out


def code_files(fn: Union[Callable, str]) -> dict[str, str]:
    """{file relative to the project root: hash} of the code stage function `fn` runs.

    `fn` may also be a module name (`"qlora_pipeline.stages.train"`), or anything whose `__module__`
    names the module (`graph.StageRef`): the module is read, never imported.
    """
    return dict(sorted((_relative(path), file_hash(path)) for name, path in _code_paths(fn)
                       if name not in FRAMEWORK_MODULES))


def library_versions(fn: Union[Callable, str]) -> dict[str, str]:
    """{"library <distribution>": installed version} of the `OUTPUT_LIBRARIES` that the code of
    `fn` (as `code_files` follows it) imports."""
    names = set().union(*(_third_party(path) for name, path in _code_paths(fn) if name not in FRAMEWORK_MODULES))
    return {f"{LIBRARY_KEY}{dist}": installed_version(dist)
            for dist in sorted({d for name in names for d in OUTPUT_LIBRARIES[name]})}


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Files added, removed or changed between two code tables (`code_files`, with
    `library_versions`), sorted; a library as "library torch 2.13.0 -> 2.14.1"."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if k.startswith(LIBRARY_KEY):
            k = f"{k} {old.get(k, 'not used')} -> {new.get(k, 'not used')}"
        elif k == STAGE_CALL_KEY:
            k = f"{k} {old.get(k, 'run')} -> {new.get(k, 'run')}"
        out.append(k)
    return out
