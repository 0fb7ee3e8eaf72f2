"""The code's shape: one-way package layers, import names of our own, stages that read only
what their fingerprint holds, and a method registry that names everything a method needs."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qlora_pipeline import codehash, methods
from qlora_pipeline.recipe import QuantizeEntry

REPO = Path(__file__).resolve().parent.parent
# Layers, lowest first: a package may import its own modules and those of the layers below.
LAYERS = ("qlora_quant", "qlora_kernels", "qlora_pipeline")


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages that `path` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in codehash.PACKAGE_FOLDERS)
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_packages_import_only_the_layers_below_them(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    folder = REPO / codehash.PACKAGE_FOLDERS[package]
    wrong = {str(p.relative_to(REPO)): sorted(_project_imports(p) - allowed) for p in folder.rglob("*.py")}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_no_file_imports_the_bare_folder_names():
    bare = {"pipeline", "quant", "kernels"}
    offenders = []
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("quant/*.py"), *REPO.glob("qlora_kernels/*.py"),
                 *REPO.glob("scripts/*.py"), *REPO.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in bare]
    assert offenders == []


def test_installed_package_folders_are_the_ones_code_hashing_reads():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == codehash.PACKAGE_FOLDERS
    for package in setuptools["packages"]:
        top, *rest = package.split(".")
        assert (REPO / codehash.PACKAGE_FOLDERS[top] / Path(*rest) / "__init__.py").is_file(), package
    folders = {p.parent for p in REPO.glob("pipeline/**/__init__.py")}
    assert len(folders) == len([p for p in setuptools["packages"] if p.startswith("qlora_pipeline")])


def test_our_code_does_not_answer_the_ecosystems_import_names(tmp_path):
    """Outside the repository `import kernels` (Hugging Face's kernel hub, which bitsandbytes
    and transformers try) must not find ours, nor `pipeline` / `quant`."""
    script = ("import importlib.util, sys\n"
              "for name in ('kernels', 'pipeline', 'quant'):\n"
              "    spec = importlib.util.find_spec(name)\n"
              "    print(name, spec.origin if spec else None)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, origin = line.split(" ", 1)
        assert origin == "None" or not _in_our_folders(origin), line


def test_the_repository_root_on_sys_path_does_not_answer_import_kernels():
    """`python -m`, `python -c` and pytest's workers put the working directory on sys.path;
    run in the repository, `import kernels` must still not find a folder of ours (transformers
    imports Hugging Face's `kernels`; a folder of that name here answered it and broke
    loading a model)."""
    script = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)"
    origin = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert origin == "None" or not _in_our_folders(origin), origin


def _in_our_folders(origin: str) -> bool:
    """Inside a folder of the repository's code (not, say, a virtual environment kept in it)."""
    return any(Path(origin).is_relative_to(REPO / folder) for folder in ("kernels", *codehash.PACKAGE_FOLDERS.values()))


def test_plan_prints_no_kernels_community_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "plan", str(REPO / "recipes/smollm2_domain.yaml"),
                           "--run-dir", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stdout + proc.stderr


def test_bitsandbytes_no_longer_finds_our_kernels_package(tmp_path):
    """bitsandbytes imports `kernels` when it loads. It used to find ours ("cannot import name
    'get_kernel' from 'kernels' (.../kernels/__init__.py)"); now it finds none, and a pipeline
    command (logging as the CLI sets it up) says nothing about it."""
    code = "import bitsandbytes, qlora_kernels.nf4_linear"
    bare = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert bare.returncode == 0, bare.stderr
    assert "get_kernel" not in bare.stderr and str(REPO) not in bare.stderr
    as_cli = subprocess.run([sys.executable, "-c", "from qlora_pipeline.cli import _setup_logging; "
                             f"_setup_logging(False); {code}"], cwd=tmp_path, capture_output=True, text=True)
    assert as_cli.returncode == 0, as_cli.stderr
    assert "kernels" not in as_cli.stdout + as_cli.stderr


@pytest.mark.parametrize("order", ["after", "before"])
def test_hub_libraries_log_errors_only_and_once_under_the_cli(tmp_path, order):
    """huggingface_hub and datasets set their loggers' level when imported and print through a
    handler of their own besides the root's: an unreachable hub dataset printed each retry
    warning twice. Under the CLI's logging, whether they were imported before it or after, a
    warning of theirs prints nothing and an error prints once."""
    emit = ("import logging; [logging.getLogger(n + '.x').warning('W-' + n) or logging.getLogger(n + '.x').error("
            "'E-' + n) for n in ('huggingface_hub', 'datasets')]")
    setup = "from qlora_pipeline.cli import _setup_logging; _setup_logging(False)"
    imports = "import huggingface_hub, datasets"
    code = "; ".join([setup, imports] if order == "after" else [imports, setup]) + "; " + emit
    env = {k: v for k, v in os.environ.items() if not k.endswith("VERBOSITY")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith(("W-", "E-"))] == ["E-huggingface_hub", "E-datasets"], lines


def _stage_modules() -> list[Path]:
    return sorted(p for p in (REPO / "pipeline" / "stages").glob("*.py") if p.name != "__init__.py")


def test_no_stage_reads_the_whole_recipe():
    """A stage reads its fingerprinted `ctx.config` slice, never `ctx.recipe`."""
    offenders = []
    for path in _stage_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "recipe":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    from qlora_pipeline.graph import StageContext

    assert "recipe" not in StageContext.__dataclass_fields__


def test_stages_take_only_file_name_constants_from_each_other():
    """Code hashing does not follow one stage module into another (codehash.STAGE_PACKAGE):
    what crosses is a constant, never code."""
    offenders = []
    for path in _stage_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_pipeline.stages."):
                offenders += [f"{path.name}: {a.name}" for a in node.names if not a.name.isupper()]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_registered_method_names_what_it_needs(name):
    method = methods.METHODS[name]
    impl = method.module()
    assert callable(impl.quantizer) and callable(impl.transform)
    fmt = method.format_module()
    for attr in ("pack", "restore", "output_convention", "quantization_config", "side_file", "CONFIG_FILE"):
        assert hasattr(fmt, attr), (method.format, attr)
    assert callable(method.loader())
    entry = QuantizeEntry(name="x", method=name, **({"group_size": 64} if method.common_settings else {}))
    settings = set(methods.relevant_settings(entry))
    assert settings >= {"name", "method", *method.options}
    assert (settings >= {"bits", "group_size"}) == method.common_settings
    assert not (settings & methods.OPTION_SECTIONS) - set(method.options)


def test_a_method_outside_the_registry_is_a_recipe_error():
    with pytest.raises(ValueError, match="unknown method 'hqq'; methods: rtn, gptq, awq, awq\\+gptq"):
        QuantizeEntry(name="x", method="hqq")


def test_the_registry_imports_no_torch():
    code = "import sys, qlora_pipeline.methods; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_quantize_stage_hashes_the_method_modules_it_imports_by_name(tmp_path):
    """The registry imports a method's modules by name; their code is the quantize stage's code
    (and the loader's, the evaluation's), so changing a method re-runs exactly its stages."""
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.runner import Runner
    from qlora_pipeline.stages import build_stages

    specs = {s.name: s for s in build_stages(load_recipe(REPO / "recipes" / "smollm2_methods.yaml")[0])}
    runner = Runner(tmp_path / "run", list(specs.values()))
    gptq, awq = runner.code(specs["quantize-gptq-w4g64"]), runner.code(specs["quantize-awq-w4g64"])
    assert {"pipeline/methods/gptq.py", "pipeline/methods/gptq_format.py", "quant/gptq.py"} <= set(gptq)
    assert "pipeline/methods/awq.py" not in gptq and "pipeline/methods/awq_format.py" not in gptq
    assert {"pipeline/methods/awq.py", "pipeline/methods/awq_format.py", "quant/awq.py"} <= set(awq)
    assert "pipeline/methods/gptq.py" not in awq
    assert "pipeline/layerwise/checkpoints.py" in runner.code(specs["evaluate-awq-w4g64"])


def test_the_suite_order_names_files_that_exist():
    """`make test` starts these files first; a renamed one would silently lose its place."""
    tests = Path(__file__).resolve().parent
    # Read, not imported: `conftest` is the name of every folder's conftest.py.
    module = ast.parse((tests / "conftest.py").read_text())
    (longest_first,) = [ast.literal_eval(node.value) for node in module.body if isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "LONGEST_FIRST" for t in node.targets)]
    assert longest_first and [name for name in longest_first if not (tests / name).is_file()] == []


def _requirement_name(spec: str) -> str:
    """The distribution name of a requirement ("triton>=3.0; platform..." -> "triton"), normalized."""
    import re

    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_every_dependency_is_pinned_in_the_constraints_set_up_installs_with():
    """`make setup` installs with constraints.txt so that a fresh set-up computes the README's
    figures; a dependency added to pyproject.toml and not pinned there would float."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_requirement_name(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]}
    wanted.discard("torch")  # the Makefile's TORCH chooses it (a CPU or a CUDA build)
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pinned[_requirement_name(name)] = version
    assert not wanted - set(pinned), f"pin in constraints.txt (make constraints): {sorted(wanted - set(pinned))}"
    assert "torch" not in pinned
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile and "-c $(CONSTRAINTS)" in makefile


def test_a_regular_install_fingerprints_the_code_as_the_editable_one_does(tmp_path):
    """`pip install .` puts the packages in site-packages under their import names
    (`qlora_pipeline/`, not `pipeline/`): `plan` and `run` failed there looking for the source
    tree. The code tables must name the files as the source tree does, so the stage cache
    and run directories agree between the two kinds of install."""
    import json
    import shutil
    import subprocess
    import sys

    from qlora_pipeline.codehash import PACKAGE_FOLDERS, code_files

    for package, folder in PACKAGE_FOLDERS.items():
        shutil.copytree(REPO / folder, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    stages = ["qlora_pipeline.stages.data", "qlora_pipeline.stages.quantize", "qlora_pipeline.stages.train"]
    script = ("import json, sys; import qlora_pipeline; from qlora_pipeline.codehash import code_files; "
              f"print(json.dumps([qlora_pipeline.__file__, [code_files(m) for m in {stages!r}]]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    where, installed = json.loads(done.stdout)
    assert where == str(tmp_path / "qlora_pipeline" / "__init__.py")
    assert installed == [code_files(m) for m in stages]
    assert "quant/gptq.py" in installed[1]
