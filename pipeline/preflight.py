"""Preflight: check the recipe's inputs on disk before a run directory or MLflow run exists.

The schema (pipeline/recipe.py) checks that paths exist; this module opens them: a local
model directory must hold a readable config.json, safetensors weights and a tokenizer, a `.gguf` file must
be a GGUF file, safetensors weights must have a readable header and be as long as it says, an
external adapter must be a PEFT LoRA directory, every local data file must
be readable and JSON/JSONL files must parse their first record. A problem found here would
otherwise surface minutes into a run, after the run directory, its lock and an MLflow run were
created; found here, it costs nothing and names its recipe key.

Contract: `check_inputs` only reads (a few bytes per data file, the small JSON files whole),
imports neither torch nor transformers, and returns every problem found, one line each,
starting with the recipe key path. Hub ids (model or data) cannot be checked offline and pass,
unless they are template placeholders (`your-org/your-domain-corpus`): those are refused by
name. `network_sources` lists what a run will download, for `validate` to say so.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Optional

from qlora_pipeline.devices import device_problem
from qlora_pipeline.errors import InputError, RecipeError
from qlora_pipeline.layerwise.families import FAMILIES, family_for
from qlora_pipeline.models import _smollm2_gguf, read_config  # light: find_spec and json, no torch
from qlora_pipeline.recipe import LOCAL_DATA_SUFFIXES
from qlora_pipeline.safetensors_header import HeaderError, read_header

GGUF_MAGIC = b"GGUF"
PARQUET_MAGIC = b"PAR1"
JSON_SUFFIXES = (".json", ".jsonl")  # read as JSON / JSON Lines by pipeline.data (which imports torch)
HEAD_BYTES = 1 << 20  # read of each data file; enough for the first record of most JSON files
MAX_RECORD_BYTES = 64 << 20  # a first JSON record longer than this is not judged
SAFETENSORS_HINT = "save it with save_pretrained(..., safe_serialization=True)"
SUPPORTED_MODEL_TYPES = tuple(sorted(t for family in FAMILIES for t in family.model_types))


def preflight(recipe, source: str = "recipe", hub_snapshot: bool = True) -> None:
    """Raise one `RecipeError` listing every input problem of a validated `recipe`.

    `source` names the recipe file in the error's first line. `hub_snapshot`: check a hub
    model's cached snapshot here; `run` checks it once it has completed the download instead.
    """
    problems = check_inputs(recipe, hub_snapshot)
    if problems:
        raise RecipeError(problems, source=source)


def check_inputs(recipe, hub_snapshot: bool = True) -> list[str]:
    """Every problem with the recipe's local inputs, each line starting with its key path."""
    problems = check_placeholders(recipe)
    problems += check_model_source(recipe.model.source, revision=recipe.model.revision, hub_snapshot=hub_snapshot)
    if recipe.merge.adapter is not None:
        adapter = Path(recipe.merge.adapter).expanduser()
        found = check_adapter(adapter, "merge.adapter")
        problems += found or check_adapter_fits(adapter, recipe.model, "merge.adapter")
    for key, source in (("data.domain", recipe.data.domain), ("data.general", recipe.data.general)):
        if source is not None and source.path is not None:
            problems += check_data_path(Path(source.path).expanduser(), source.text_field, f"{key}.path")
    problems += check_tracking_uri(recipe.tracking.uri if recipe.tracking.enabled else None)
    for i, entry in enumerate(recipe.quantize):
        problem = device_problem(entry.device, f"quantize.{i}.device")
        if problem:
            problems.append(problem)
    return problems


def run_problems(recipe) -> list[str]:
    """What only `run` refuses here: settings a GPU template may carry that `validate` and `plan`
    on a machine without one accept (recipes/llama3_domain.yaml evaluates on cuda), but that a
    run here would fail on in evaluate-base, after data and base ran."""
    problem = device_problem(recipe.evaluate.device, "evaluate.device")
    return [problem] if problem else []


def outputs_inside_data(recipe, places: list[tuple[str, Optional[Path], str]]) -> list[str]:
    """Folders the pipeline writes (`places`: what, path, how to move it) that lie inside a
    local data folder: the data stage reads every data file under the folder, so the run's own
    records (run.json, data.json, report.md, the metrics that quote the test split) or the
    caches' (file_hashes.json) would join the corpus on the next run, and change its
    fingerprint on every run."""
    problems = []
    for key, source in (("data.domain.path", recipe.data.domain), ("data.general.path", recipe.data.general)):
        if source is None or source.path is None or not Path(source.path).expanduser().is_dir():
            continue
        folder = Path(source.path).expanduser().resolve()
        for what, path, fix in places:
            if path is not None and folder in (path.expanduser().resolve(), *path.expanduser().resolve().parents):
                problems.append(f"{key}: {what} {path} is inside this data folder ({folder}), whose .json, .md and "
                                f".txt files the data stage reads as text: the pipeline's own files would become "
                                f"training text; put {what} outside it ({fix}), or the data in a folder of its own")
    return problems


def cache_places(recipe) -> list[tuple[str, Optional[Path], str]]:
    """The caches a command may write before it plans (`outputs_inside_data`): the project's
    cache folder (converted models, remembered file hashes) and the stage cache."""
    from qlora_pipeline.models import cache_root
    from qlora_pipeline.stagecache import open_cache

    cache = open_cache(recipe.run.cache)
    return [("the cache folder", cache_root(), "$QLP_CACHE or $XDG_CACHE_HOME"),
            ("the stage cache", cache.root if cache else None, "run.cache.dir or $QLP_STAGE_CACHE")]


# ----------------------------------------------------------------------------- hub sources

# A path segment of a hub id that stands for "put yours here": your-org, YOUR_DATASET, <name>,
# placeholder, changeme, todo, xxx.
PLACEHOLDER_SEGMENT = re.compile(r"(your([-_].*)?|<.*>|\{.*\}|.*placeholder.*|change[-_]?me|todo|x{3,})", re.IGNORECASE)


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # org/name, or a bare name


def is_hub_model(src: str) -> bool:
    """A model source that names a hub repository (not built in, not a local path)."""
    return not src.startswith("builtin:") and not Path(src).expanduser().exists()


def is_placeholder(repo_id: str) -> bool:
    return any(PLACEHOLDER_SEGMENT.fullmatch(part) for part in repo_id.split("/"))


def check_placeholders(recipe) -> list[str]:
    """Hub ids left as a template's placeholders: refused before anything runs, by key."""
    problems = []
    if is_hub_model(recipe.model.source) and is_placeholder(recipe.model.source):
        problems.append(f"model.source: '{recipe.model.source}' is a placeholder, not a model; give a hub model id "
                        "(e.g. meta-llama/Meta-Llama-3-8B), a local HF model directory or a .gguf file")
    for key, source in (("data.domain", recipe.data.domain), ("data.general", recipe.data.general)):
        if source is not None and source.hub is not None and is_placeholder(source.hub):
            problems.append(f"{key}.hub: '{source.hub}' is a placeholder, not a dataset; give your corpus's hub "
                            f"dataset id, or replace `hub:` with `path:` and a local .txt/.md/.jsonl/.parquet "
                            "file or folder")
        elif source is not None and source.hub is not None and not HUB_ID.fullmatch(source.hub):
            # the hub refuses it too, but only once the data stage runs
            problems.append(f"{key}.hub: '{source.hub}' is not a hub dataset id like 'Salesforce/wikitext' (letters, "
                            "digits, '-', '_', '.', one '/'); for local files replace `hub:` with `path:`")
    return problems


def network_sources(recipe) -> list[str]:
    """What a run downloads from the Hugging Face hub, one line per source, starting with its key.
    (Information: a download happens once; the hub cache serves later runs.)"""
    lines = []
    src = recipe.model.source
    if is_hub_model(src):
        rev = f" at revision {recipe.model.revision}" if recipe.model.revision else ""
        lines.append(f"model.source: hub model {src}{rev} (downloaded on the first run; gated models need "
                     "`huggingface-cli login`)")
    for key, source in (("data.domain", recipe.data.domain), ("data.general", recipe.data.general)):
        if source is not None and source.hub is not None:
            config = f", config {source.config}" if source.config else ""
            rev = f", revision {source.revision}" if source.revision else ""
            lines.append(f"{key}.hub: hub dataset {source.hub}{config}{rev}, split {source.split} (downloaded by the "
                         "data stage)")
    return lines


def sqlite_store_path(uri: Optional[str]) -> Optional[Path]:
    """The file of a `sqlite:///PATH` tracking URI (None for other stores and in-memory SQLite)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
    return None if str(path) in ("", ".", ":memory:") else path


# Tracking URI schemes MLflow opens (databases through SQLAlchemy, with an optional +driver).
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc",
                    "file")


def check_tracking_uri(uri: Optional[str], key: str = "tracking.uri") -> list[str]:
    """A tracking URI MLflow can open. A typo here (`sqlite://mlflow.db`, `sqllite:///...`,
    `http//host`) would not stop a run: MLflow fails to connect and the whole run goes
    untracked, with one warning. A local SQLite store needs an existing folder (MLflow creates
    the file, not the folder)."""
    if not uri:
        return []
    example = "e.g. sqlite:///mlflow.db (a file in the current folder) or http://host:5000"
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else None
    if uri.startswith("sqlite://") and not uri.startswith("sqlite:///"):
        return [f"{key}: '{uri}' is not a SQLite URI MLflow opens: a file path takes three slashes "
                f"(sqlite:///{uri[len('sqlite://'):]} for a file in the current folder, four for an absolute path)"]
    if scheme is not None and scheme not in TRACKING_SCHEMES:
        return [f"{key}: '{uri}' has the unknown scheme '{scheme}://'; MLflow opens {', '.join(TRACKING_SCHEMES[:6])}, "
                f"...; {example}"]
    if (scheme is None or scheme == "file") and not _file_store_allowed():
        return [f"{key}: '{uri}' names MLflow's file store (a folder), which MLflow {_mlflow_version()} refuses "
                f"unless MLFLOW_ALLOW_FILE_STORE=true; give a store URI, {example}"]
    if uri.startswith(("sqlite:///~", "file:~", "~")):
        return [f"{key}: '{uri}': MLflow does not expand '~'; write the absolute path "
                f"(sqlite:///{Path('~').expanduser()}/...)"]
    path = sqlite_store_path(uri)
    if path is not None and path.is_dir():  # MLflow retries for about 100 s, then the run goes untracked
        return [f"{key}: '{uri}' names the folder {path}, not a SQLite store file; name a file in it, e.g. "
                f"sqlite:///{path / 'mlflow.db'}"]
    if path is not None and path.is_file() and not is_sqlite(path):
        return [f"{key}: {path} is not a SQLite database; name a new file (MLflow creates it) or the store MLflow "
                "made"]
    if path is None or path.parent.is_dir():
        return []
    return [f"{key}: folder {path.parent} of the SQLite store {path.name} does not exist; create it or "
            f"change {key}"]


def is_sqlite(path: Path) -> bool:
    """Whether `path` starts as a SQLite database does (an empty file: MLflow makes it one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        return not head or head == b"SQLite format 3\x00"
    except OSError:
        return True  # unreadable: MLflow says why



def _mlflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlflow")
    except PackageNotFoundError:
        return "?"


def _file_store_allowed() -> bool:
    """MLflow 3.13 and later refuse a file store (a folder) unless MLFLOW_ALLOW_FILE_STORE is true."""
    import os

    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes"):
        return True
    try:
        major, minor = (int(x) for x in _mlflow_version().split(".")[:2])
    except ValueError:
        return True  # unknown version: let MLflow judge
    return (major, minor) < (3, 13)


# ----------------------------------------------------------------------------- model


def check_model_source(src: str, key: str = "model.source", revision: Optional[str] = None,
                       hub_snapshot: bool = True) -> list[str]:
    """Problems with a model source: the built-in package, a .gguf file, an HF directory, or a
    hub model's snapshot when the local hub cache holds it (one not downloaded yet is checked
    when `run` has downloaded it)."""
    if src.startswith("builtin:"):
        try:
            gguf = _smollm2_gguf()
        except InputError as exc:
            return [str(exc)]
        return check_gguf(gguf, key)
    path = Path(src).expanduser()
    if path.is_file():
        return check_gguf(path, key)
    if path.is_dir():
        return check_model_dir(path, key)
    from qlora_pipeline.models import cached_hub_snapshot

    snapshot = cached_hub_snapshot(src, revision) if hub_snapshot else None
    return check_model_dir(snapshot, key) if snapshot is not None else []


def check_gguf(path: Path, key: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        return [f"{key}: cannot read {path} ({_oserror(exc)})"]
    if magic != GGUF_MAGIC:
        return [f"{key}: {path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                "give a .gguf model file or a Hugging Face model directory"]
    return []


def check_model_dir(path: Path, key: str) -> list[str]:
    """A Hugging Face model directory: config.json (a JSON object with model_type) and
    safetensors weights (model.safetensors, or an index whose every shard is present)."""
    problems = []
    try:
        config = read_config(path, key)
    except InputError as exc:
        problems.append(str(exc))
        config = None
    if config is not None and "model_type" not in config:
        problems.append(f"{key}: {path / 'config.json'} has no 'model_type'; it must be the config.json "
                        "that save_pretrained writes (e.g. \"model_type\": \"llama\")")
    elif config is not None and config["model_type"] not in SUPPORTED_MODEL_TYPES:
        # Every stage from base on walks the decoder layers by family; an unknown one would
        # pass `validate` (without quantize entries) and fail minutes into a run.
        problems.append(f"{key}: {path} holds a '{config['model_type']}' model, which is not supported yet; "
                        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only Llama-style "
                        "models)")
    weight_problems = check_weights(path, key)
    problems += weight_problems
    if config is not None and not weight_problems:
        problems += check_config_matches_weights(path, config, key)
    if config is not None:
        problems += check_config_shapes(config, path, key)
    problems += check_tokenizer(path, key, config)
    return problems


def check_config_shapes(config: dict, path: Path, key: str) -> list[str]:
    """The sizes a Llama-style config.json must agree on, which transformers checks only when a
    stage loads the model (its message cut off at a colon): positive integers, heads that
    divide the hidden size, key/value heads that divide the heads."""
    where = f"{key}: {path / 'config.json'}"
    fix = "use the config.json saved with the weights"
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    bad = [f"{k} = {config[k]!r}" for k in sizes if k in config and not _positive_int(config[k])]
    if "num_key_value_heads" in config and config["num_key_value_heads"] is not None \
            and not _positive_int(config["num_key_value_heads"]):
        bad.append(f"num_key_value_heads = {config['num_key_value_heads']!r}")
    if bad:
        return [f"{where} has {', '.join(bad)}, not a positive whole number; {fix}"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if hidden and heads and not config.get("head_dim") and hidden % heads:
        return [f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; {fix}"]
    if heads and kv and heads % kv:
        return [f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}; {fix}"]
    return []


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config_matches_weights(path: Path, config: dict, key: str) -> list[str]:
    """A config.json that does not describe its weights (edited, or copied from another size of
    the model): the embedding's shape against vocab_size x hidden_size, the layers the weights
    hold against num_hidden_layers. transformers' own refusal comes in the first evaluation, as
    "ignore_mismatched_sizes ... look at the above report" with no report. Headers only."""
    index = path / "model.safetensors.index.json"
    files = sorted({str(f) for f in (read_json_object(index, key)[0] or {}).get("weight_map", {}).values()}) \
        if index.exists() else ["model.safetensors"]
    shapes: dict[str, list] = {}
    dtypes: dict[str, str] = {}
    for name in files:
        table, _ = read_safetensors_header(path / name, key)
        shapes.update({t: meta.get("shape") for t, meta in (table or {}).items() if isinstance(meta, dict)})
        dtypes.update({t: meta.get("dtype") for t, meta in (table or {}).items() if isinstance(meta, dict)})
    fix = f"{path / 'config.json'} does not describe the weights beside it; use the config.json saved with them"
    embedding = next((shape for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), None)
    expected = [config.get("vocab_size"), config.get("hidden_size")]
    if embedding is not None and all(isinstance(v, int) for v in expected) and list(embedding) != expected:
        return [f"{key}: the embedding is {embedding[0]} x {embedding[1]} and config.json says vocab_size x "
                f"hidden_size = {expected[0]} x {expected[1]}; {fix}"]
    layers = {int(m[1]) for name in shapes for m in [LAYER_INDEX.search(name)] if m}
    stated = config.get("num_hidden_layers")
    if layers and isinstance(stated, int) and max(layers) + 1 != stated:
        return [f"{key}: the weights hold {max(layers) + 1} decoder layers and config.json says num_hidden_layers = "
                f"{stated}; {fix}"]
    return _linear_problems(config, shapes, dtypes, key, fix)


FLOAT_DTYPES = ("BF16", "F16", "F32")


def _linear_problems(config: dict, shapes: dict[str, list], dtypes: dict[str, str], key: str, fix: str) -> list[str]:
    """Every decoder linear of a float Llama-style checkpoint present, floating point, and of
    the shape its config gives (headers only): a linear missing or renamed stopped the base
    stage, one of another shape or an integer dtype the first evaluation, with a transformers
    message cut off at its colon."""
    if config.get("quantization_config") or not all(_positive_int(config.get(k)) for k in
                                                    ("hidden_size", "intermediate_size", "num_attention_heads")):
        return []  # a prequantized checkpoint has other tensors; bad sizes are check_config_shapes'
    try:
        family = family_for(config.get("model_type", "?"))
        linears = family.linear_names(config)
    except (InputError, KeyError, TypeError, ValueError):
        return []
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    expected = {"self_attn.q_proj": [heads * head_dim, hidden], "self_attn.k_proj": [kv * head_dim, hidden],
                "self_attn.v_proj": [kv * head_dim, hidden], "self_attn.o_proj": [hidden, heads * head_dim],
                "mlp.gate_proj": [inter, hidden], "mlp.up_proj": [inter, hidden], "mlp.down_proj": [hidden, inter]}
    for full, short in linears:
        name = f"{full}.weight"
        if name not in shapes:
            return [f"{key}: the weights have no {name}, which a {config['model_type']} model with this config.json "
                    f"holds; {fix}"]
        if short in expected and list(shapes[name]) != expected[short]:
            return [f"{key}: {name} is {' x '.join(map(str, shapes[name]))} and config.json gives "
                    f"{' x '.join(map(str, expected[short]))}; {fix}"]
        if dtypes.get(name) not in FLOAT_DTYPES:
            return [f"{key}: {name} is stored as {dtypes.get(name)}, not a float type ({', '.join(FLOAT_DTYPES)}); "
                    "give the model's float checkpoint (bf16, fp16 or fp32)"]
    return []


# What AutoTokenizer can build a tokenizer from: a fast tokenizer's tokenizer.json, a
# SentencePiece model (Llama-2, Mistral, Gemma, T5), a BPE vocabulary with its merges (GPT-2,
# Qwen), or a tiktoken file. Every stage tokenizes, so without one a run fails in its first stage.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",), ("vocab.json", "merges.txt"))


# The tokenizer's JSON files that AutoTokenizer parses when they are there.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def check_tokenizer(path: Path, key: str, config: Optional[dict] = None) -> list[str]:
    """A tokenizer AutoTokenizer can build, whose JSON files parse, and (tokenizer.json) whose
    token ids all fit the model's embedding (`vocab_size` of `config`): a damaged file failed
    the data stage with a bare JSONDecodeError, and a token id past the embedding an
    evaluation with "index out of range in self"."""
    if not (any(all((path / name).is_file() for name in files) for files in TOKENIZER_FILES)
            or list(path.glob("*.tiktoken"))):
        return [f"{key}: {path} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt); "
                "copy the tokenizer files saved with the model (tokenizer.save_pretrained(...) into the same folder)"]
    fix = "copy the tokenizer files saved with the model again (tokenizer.save_pretrained(...))"
    parsed = {}
    for name in TOKENIZER_JSON:
        if (path / name).is_file():
            parsed[name], problem = read_json_object(path / name, key)
            if problem:
                return [f"{problem}; {fix}"]
    if "tokenizer.json" in parsed:  # JSON, but is it a tokenizer? ('{}' failed the data stage with KeyError)
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the library's own error says what is missing
            return [f"{key}: {path / 'tokenizer.json'} is not a tokenizer the tokenizers library can read ({exc}); {fix}"]
    vocab_size = (config or {}).get("vocab_size")
    top = _largest_token_id(parsed.get("tokenizer.json"))
    if isinstance(vocab_size, int) and top is not None and top >= vocab_size:
        return [f"{key}: {path / 'tokenizer.json'} has token ids up to {top} but the model's vocab_size is {vocab_size} "
                f"(config.json): the tokenizer belongs to another model; {fix}"]
    return []


def _largest_token_id(tokenizer: Optional[dict]) -> Optional[int]:
    """The largest id of a tokenizer.json's vocabulary (a BPE/WordPiece map of token to id, or a
    Unigram list whose index is the id) and added tokens; None if it has neither."""
    if not isinstance(tokenizer, dict):
        return None
    ids: list[int] = []
    vocab = (tokenizer.get("model") or {}).get("vocab") if isinstance(tokenizer.get("model"), dict) else None
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list) and vocab:
        ids.append(len(vocab) - 1)
    ids += [t["id"] for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    return max(ids) if ids else None


def check_weights(path: Path, key: str) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        table, problem = read_json_object(index, key)
        if problem:
            return [f"{problem}; re-save the model ({SAFETENSORS_HINT})"]
        weight_map = table.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return [f"{key}: {index} has no 'weight_map' of tensor names to shard files; re-save the model "
                    f"({SAFETENSORS_HINT})"]
        shards = sorted({str(f) for f in weight_map.values()})
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return [f"{key}: {len(missing)} of the {len(shards)} shard file(s) listed in {index.name} are missing "
                    f"from {path}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                    "copy the complete checkpoint"]
        return [p for p in (safetensors_problem(path / s, key) for s in shards) if p][:3]
    if (path / "model.safetensors").is_file():
        problem = safetensors_problem(path / "model.safetensors", key)
        return [problem] if problem else []
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        return [f"{key}: {path} holds PyTorch .bin/.pt (pickle) weights, which are not supported (they can run "
                f"code when loaded); convert them: load the model with transformers and {SAFETENSORS_HINT}"]
    return [f"{key}: {path} has no weights (expected model.safetensors or model.safetensors.index.json with its "
            f"shards); {SAFETENSORS_HINT}"]


def safetensors_problem(f: Path, key: str) -> Optional[str]:
    """A safetensors file that cannot be loaded whole: its header (8 bytes of length, then a
    JSON table of tensors with their byte ranges) unreadable, or tensors extending past the
    end of the file (a copy cut short). Reads the header only, not the weights."""
    return read_safetensors_header(f, key)[1]


def read_safetensors_header(f: Path, key: str) -> tuple[Optional[dict], Optional[str]]:
    """(the tensor table of a safetensors file, None), or (None, a problem line): see
    `safetensors_problem`."""
    fix = "copy the model again (or re-save it with save_pretrained)"
    try:
        header = read_header(f)
        size = f.stat().st_size
    except OSError as exc:
        return None, f"{key}: cannot read {f} ({_oserror(exc)})"
    except HeaderError as exc:
        return None, f"{key}: {f} {exc}; {fix}"
    if 8 + header.header_bytes + header.data_end > size:
        return None, (f"{key}: {f} is truncated: its tensors need {8 + header.header_bytes + header.data_end} bytes, "
                      f"the file has {size}; {fix}")
    return header.tensors, None


def check_adapter(path: Path, key: str) -> list[str]:
    """A PEFT adapter directory: a readable adapter_config.json and adapter_model.safetensors."""
    problems = []
    _, problem = read_json_object(path / "adapter_config.json", key)
    if problem:
        problems.append(f"{problem}; it must be the adapter_config.json that PEFT's save_pretrained writes")
    if not (path / "adapter_model.safetensors").is_file():
        pickled = (path / "adapter_model.bin").is_file()
        problems.append(f"{key}: {path} has no adapter_model.safetensors"
                        + (" (adapter_model.bin pickle weights are not supported)" if pickled else "")
                        + f"; {SAFETENSORS_HINT}")
    else:
        problem = safetensors_problem(path / "adapter_model.safetensors", key)
        if problem:
            problems.append(problem)
    return problems


LORA_A = re.compile(r"\.(\d+)\.(.+)\.lora_A(?:\.[^.]+)?\.weight$")  # layers.<i>.<linear>.lora_A[.<name>].weight


def check_adapter_fits(path: Path, model_cfg, key: str) -> list[str]:
    """An adapter trained on another model (another width or depth): its LoRA A matrices
    take as many inputs as the linear they adapt. Found here, not by the merge's
    "size of tensor a (64) must match ... b (128)" after data and base ran. Checked when the
    model's config.json is on disk (a local directory, a converted GGUF)."""
    from qlora_pipeline.models import cached_config

    try:
        config = cached_config(model_cfg)
        family = family_for(config["model_type"]) if config else None
        widths = family.linear_in_features(config) if family else {}
        layers = int(config["num_hidden_layers"]) if config else 0
    except (InputError, KeyError, TypeError, ValueError):
        return []  # the model's own problems are reported by check_model_source
    table, _ = read_safetensors_header(path / "adapter_model.safetensors", key)
    for name, meta in (table or {}).items():
        found = LORA_A.search(name) if family and name.startswith("base_model.model.") else None
        if not found or not isinstance(meta, dict) or not isinstance(meta.get("shape"), list):
            continue
        layer, linear = int(found[1]), found[2]
        if layer >= layers:
            return [f"{key}: {path} adapts layer {layer}, and the model has {layers} layers: it was trained on "
                    f"another model; give the adapter trained on model.source {model_cfg.source}"]
        if linear in widths and meta["shape"][-1:] != [widths[linear]]:
            return [f"{key}: {path} adapts {linear} with {meta['shape'][-1]} inputs, and the model's {linear} has "
                    f"{widths[linear]}: it was trained on another model; give the adapter trained on model.source "
                    f"{model_cfg.source}"]
    return []


# ----------------------------------------------------------------------------- data


def data_files(path: Path) -> list[Path]:
    """The files `pipeline.data` reads for a local source: the file itself, or every file
    with a supported suffix under the folder (other files are ignored there too)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in LOCAL_DATA_SUFFIXES and not p.is_dir())


def check_data_path(path: Path, text_field: str, key: str) -> list[str]:
    """Every data file readable; the first record of each JSON/JSONL file parses and holds
    `text_field`. Reports at most a few files per source, then a count."""
    problems = []
    for f in data_files(path):
        problem = check_data_file(f, text_field, key)
        if problem:
            problems.append(problem)
    if len(problems) > 5:
        problems = problems[:5] + [f"{key}: ... and {len(problems) - 5} more unreadable file(s) under {path}"]
    return problems


def check_data_file(f: Path, text_field: str, key: str) -> Optional[str]:
    if not f.is_file():  # a dangling link: the data it pointed to would be silently missing
        return f"{key}: {f} is a broken link or not a regular file; fix it or remove it"
    try:
        with open(f, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        return f"{key}: cannot read {f} ({_oserror(exc)}); fix its permissions or remove it"
    if f.suffix == ".parquet":
        if head[:4] != PARQUET_MAGIC:
            return f"{key}: {f} is not a parquet file (no PAR1 magic bytes); fix it or remove it"
        return None
    problem = _utf8_problem(f, head, key)
    if problem or f.suffix not in JSON_SUFFIXES:
        return problem
    return _check_first_record(f, text_field, key)


def _utf8_problem(f: Path, head: bytes, key: str) -> Optional[str]:
    try:
        # Incremental: a multi-byte character cut off at the end of the head is not an error.
        codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=len(head) < HEAD_BYTES)
    except UnicodeDecodeError as exc:
        return f"{key}: {f} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8 or remove it"
    return None


def _check_first_record(f: Path, text_field: str, key: str) -> Optional[str]:
    """The first record of a JSON Lines file, or of a JSON array, must parse and be an object
    holding the text field. When the file is longer than what was read, a parse error is only
    reported once reading more of the file does not move it (so a long first record cut off
    at the end of the read is not mistaken for a broken one); a first record longer than
    MAX_RECORD_BYTES is not judged."""
    size, previous = HEAD_BYTES, None
    while True:
        with open(f, "rb") as fh:
            raw = fh.read(size)
        complete = len(raw) < size
        text = raw.decode("utf-8-sig", errors="replace")
        stripped = text.lstrip()
        if not stripped:
            return None  # no records: pipeline.data reports a source without text
        offset = len(text) - len(stripped)
        if stripped[0] == "[":  # a JSON array of records: its first element
            rest = stripped[1:].lstrip()
            if rest.startswith("]"):
                return None
            offset = len(text) - len(rest)
        try:
            record, _ = json.JSONDecoder().raw_decode(text, offset)
            break
        except json.JSONDecodeError as exc:
            where = (exc.pos, exc.msg)
            settled = where == previous and not exc.msg.startswith("Unterminated string")
            if complete or settled:
                return (f"{key}: {f}: first record is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}); fix the file (JSON Lines: one object per line) or remove it")
            if size >= MAX_RECORD_BYTES:
                return None
            size, previous = size * 4, where
    if not isinstance(record, dict):
        return (f"{key}: {f}: first record is a JSON {type(record).__name__}, not an object; "
                f"give one object per record with the text under '{text_field}'")
    field_key = key.rsplit(".", 1)[0] + ".text_field"
    if text_field not in record:
        return (f"{field_key}: {f}: first record has no '{text_field}' field (its keys: "
                f"{', '.join(map(str, list(record)[:8])) or 'none'}); set {field_key} to the field holding the text")
    value = record[text_field]
    if value is not None and not isinstance(value, str):  # null: an empty record, skipped like an empty string
        kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}[type(value)]
        return (f"{field_key}: {f}: the first record's '{text_field}' is {kind}, not a string; set {field_key} to "
                "the field holding the text")
    return None


# ----------------------------------------------------------------------------- helpers


def read_json_object(path: Path, key: str) -> tuple[Any, Optional[str]]:
    """(the parsed JSON object, None), or (None, a problem line naming `key` and `path`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{key}: {path} is missing"
    except OSError as exc:
        return None, f"{key}: cannot read {path} ({_oserror(exc)})"
    except UnicodeDecodeError:
        return None, f"{key}: {path} is not UTF-8 text"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"{key}: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    if not isinstance(value, dict):
        return None, f"{key}: {path} holds a JSON {type(value).__name__}, not an object"
    return value, None


def _oserror(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"
