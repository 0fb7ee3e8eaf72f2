"""The recipe: a typed schema (pydantic, every default defined here once), YAML loading,
`--set key.path=value` overrides, and error reports that name each key path.

Sections: model, data, nf4, lora, train, merge, calibration, quantize, evaluate, deploy, tracking, run.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.methods import METHODS, format_problems, reads
from qlora_pipeline.methods import dynamic as module_overrides

BUILTIN_MODELS = ("smollm2-135m",)
BuiltinCorpus = Literal["python-docs", "python-stdlib"]
# Local data files by suffix: plain text, JSON records, parquet (qlora_pipeline.data reads them).
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIX = ".parquet"
LOCAL_DATA_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + (PARQUET_SUFFIX,)
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

Dtype = Literal["bfloat16", "float16", "float32"]


MAX_SEED = 2**32 - 1  # torch's generators take 64 bits; the training order multiplies the seed by ~10^6
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
_SEED = TypeAdapter(Seed)


class _Section(BaseModel):
    # No .inf/.nan for any number: an infinite learning rate or threshold is a typo, not a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, v, info):
        # pydantic reads true/false as 1/0 for a number: `steps: true` would train one step.
        if isinstance(v, bool) and _without_none(cls.model_fields[info.field_name].annotation) in (int, float):
            raise ValueError(f"must be a number, not {str(v).lower()}")
        return v


class ModelConfig(_Section):
    """Where the base model comes from."""

    source: str = Field(
        "builtin:smollm2-135m",
        description="builtin:smollm2-135m | a local HF directory | a .gguf file | a hub id (org/name)",
    )
    revision: Optional[str] = Field(None, description="hub revision (hub ids only)")
    dtype: Dtype = Field("bfloat16", description="dtype of the weights as loaded for quantization and merging")

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        if not v.strip():  # Path("") is the current folder
            raise ValueError("empty; give builtin:smollm2-135m, an HF model directory, a .gguf file or a hub id")
        if v.startswith("builtin:"):
            name = v.split(":", 1)[1]
            if name not in BUILTIN_MODELS:
                raise ValueError(f"unknown built-in model '{name}'; available: {', '.join(BUILTIN_MODELS)}")
            return v
        path = Path(v).expanduser()
        looks_like_path = v.startswith((".", "/", "~")) or v.endswith(".gguf") or path.exists()
        if looks_like_path:
            if not path.exists():
                raise ValueError(f"path '{v}' does not exist; give an HF model directory, a .gguf file or a hub id")
            if path.is_dir() and not (path / "config.json").exists():
                raise ValueError(f"directory '{v}' has no config.json; it is not a Hugging Face model directory")
            if path.is_file() and path.suffix != ".gguf":
                raise ValueError(f"file '{v}' is not a .gguf file; give a GGUF file or an HF model directory")
            return v
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", v):
            raise ValueError(f"'{v}' is neither an existing path nor a hub id like 'meta-llama/Meta-Llama-3-8B'")
        return v


class DataSource(_Section):
    """Exactly one of `builtin`, `path` or `hub`."""

    builtin: Optional[BuiltinCorpus] = None
    path: Optional[str] = Field(None, description="a .txt/.md/.rst/.json/.jsonl/.parquet file or a folder of them")
    hub: Optional[str] = Field(None, description="a hub dataset id (needs network)")
    config: Optional[str] = Field(None, description="configuration (subset) of a hub dataset, for datasets that "
                                  "have several (e.g. Salesforce/wikitext: wikitext-103-raw-v1)")
    revision: Optional[str] = Field(None, description="branch, tag or 40-character commit of a hub dataset "
                                    "(default: main); a commit pins the text")
    split: str = Field("train", description="split of a hub dataset")
    text_field: str = Field("text", description="column holding the text in JSON/JSONL/parquet/hub data")
    document_chars: Optional[int] = Field(
        None, ge=1, description="split every document longer than this into consecutive documents of at least "
        "this many characters, each ending at the first paragraph break (a blank line) after that many, or at the "
        "first line break after that many where no paragraph break comes within twice that many: for text that "
        "is one or a few big files (a book, a manual), which the split by document cannot divide. null: a text "
        "file, a JSON/parquet record or a hub row is one document")

    @model_validator(mode="after")
    def _exactly_one(self) -> "DataSource":
        given = [k for k in ("builtin", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of builtin, path, hub (got {', '.join(given) or 'none'})")
        if self.config is not None and self.hub is None:
            raise ValueError("config names a configuration of a hub dataset; it needs hub")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision names a version of a hub dataset; it needs hub")
        if self.path is not None:
            path = Path(self.path).expanduser()
            if not path.exists():
                raise ValueError(f"path '{self.path}' does not exist")
            if path.is_file():
                if path.suffix not in LOCAL_DATA_SUFFIXES:
                    raise ValueError(f"'{self.path}' has suffix '{path.suffix}'; supported: {', '.join(LOCAL_DATA_SUFFIXES)}")
                if path.stat().st_size == 0:
                    raise ValueError(f"file '{self.path}' is empty")
            elif not any(p.suffix in LOCAL_DATA_SUFFIXES and p.stat().st_size > 0 for p in path.rglob("*") if p.is_file()):
                raise ValueError(f"folder '{self.path}' holds no non-empty {'/'.join(LOCAL_DATA_SUFFIXES)} file")
        return self


class DecontaminateConfig(_Section):
    """Held-out text removed from the training side of each split pair (see `pipeline.data`)."""

    min_chars: int = Field(
        80, ge=1, description="a stretch of training text (whitespace-normalized, lower case) that the held-out text "
        "also holds is cut from this many characters; shorter ones (headings, 'Changed in version 3.x.', one-line "
        "code) recur legitimately",
    )
    quote_markers: bool = Field(
        True, description="also compare the texts with the quote markers that start lines blanked ('> ', '>> ', "
        "'> > ', a doctest's '>>> '), so a held-out paragraph quoted line by line in a reply is cut too; costs a "
        "second comparison where any text has such lines (1.1-1.3x the data stage on the code corpora in the README)",
    )
    near_duplicates: bool = Field(
        False, description="also drop training-side paragraphs that are near-duplicates of a held-out paragraph "
        "(MinHash LSH over word shingles; for large corpora with boilerplate, e.g. hub datasets)",
    )
    near_duplicate_jaccard: float = Field(
        0.7, gt=0, le=1, description="word-shingle Jaccard similarity from which a paragraph is a near duplicate",
    )
    shingle_words: int = Field(3, ge=1, description="words per shingle for the near-duplicate comparison")


class DataConfig(_Section):
    domain: DataSource = Field(default_factory=lambda: DataSource(builtin="python-docs"))
    general: Optional[DataSource] = Field(
        default_factory=lambda: DataSource(builtin="python-stdlib"),
        description="general text, evaluated only (never trained on); null to skip",
    )
    seq_len: int = Field(512, ge=16, le=131072, description="tokens per window for training and evaluation")
    holdout_every: int = Field(
        5, ge=2, description="domain document i (in source order) goes to the test split (domain_eval) when "
        "i % holdout_every == 0",
    )
    # 5: of python-docs' 63 non-test topics, 13 validate (20k tokens, about as many as the 16
    # test topics hold: enough for train.eval_windows and a stable merge.into: auto) and 50
    # train (49: 'if' repeats the test topic 'else'), 64k tokens; 4 would validate on 31k and
    # leave 50k to train. Larger corpora can afford a larger value (a smaller validation share).
    valid_every: int = Field(
        5, ge=2, description="of the documents not in the test split, in order, the j-th goes to the validation "
        "split (domain_valid) when j % valid_every == 0, the others to training",
    )
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    general_max_tokens: int = Field(200_000, ge=1, description="tokens of general text to prepare")
    general_train_tokens: int = Field(
        200_000, ge=1, description="tokens of the general *train* split, prepared only when a quantize entry "
        "calibrates on general text (calibration.source / calibration_source: general): documents after those "
        "general_eval uses, with every general_eval and domain test paragraph cut out")


class NF4Config(_Section):
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: Literal[True] = Field(True, description="double quantization of the absmax (the only mode supported)")
    compute_dtype: Dtype = "bfloat16"


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=4096, description="adapter rank; past a few hundred it is a full fine-tune's size "
                   "(4096 at most: a larger one failed training with an overflow)")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


# Train settings that change how often the stage checkpoints, never a byte of the adapter (a
# resumed run gives an uninterrupted run's bytes): they reach the stage as runtime settings.
TRAIN_CHECKPOINTING = ("save_interval", "keep_checkpoints")


class TrainConfig(_Section):
    steps: int = Field(200, ge=1, le=10**9)
    seq_len: Optional[int] = Field(None, ge=16, description="training window length; null: data.seq_len")
    learning_rate: float = Field(2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    # Upper bounds keep sample indices and seeds inside int64 (a typo of 10^20 crashed deep in
    # training); far above any real setting.
    micro_batch_size: int = Field(4, ge=1, le=65536)
    gradient_accumulation: int = Field(1, ge=1, le=65536)
    gradient_checkpointing: bool = False
    optimizer: Literal["paged_adamw_8bit", "adamw"] = "paged_adamw_8bit"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_interval: int = Field(50, ge=1)
    eval_windows: int = Field(16, ge=1, description="domain_valid windows for the eval loss every eval_interval (the test split is never used in training)")
    save_interval: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="resumable checkpoints kept in train/checkpoints")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="compute dtype; auto: nf4.compute_dtype on CUDA, float32 on CPU"
    )
    seed: Seed = 0

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self


class MergeConfig(_Section):
    into: Literal["dequantized", "original", "auto"] = Field(
        "dequantized", description="auto: merge both ways, keep the lower perplexity on domain_valid (never the test split)")
    adapter: Optional[str] = Field(None, description="merge this PEFT adapter directory instead of training one")
    # Measured max |logit diff| of correct bf16 merges (4 windows of 256 tokens; float32 on CPU):
    #   builtin:smollm2-135m with recipes/smollm2_domain.yaml's lora/train settings but
    #     train.steps=10 (`pipeline run R --only data`, then base, train, merge; then
    #     `--only merge --force --set merge.into=original`): into dequantized 0.204, into
    #     original 0.392 (its float32 weights rounded too; mean |logit| 8.1);
    #   random Llama hidden 1024, 4 layers, 16 heads / 4 KV, 12 steps: 0.024 (both ways);
    #   tests/conftest.py make_tiny_llama, 12 steps: 0.0027 (both ways).
    # Merges made wrong on purpose (Adapter.delta monkeypatched): smollm2 delta dropped 12.1,
    # doubled 12.2; random 1024-wide dropped 3.4. 2.0 is 5x the largest correct merge and 6x below
    # the smallest wrong one on the real model. (The tiny model's logits are too small for any
    # threshold: dropping its adapter moves them by only 0.27, so its test scales the head.)
    verify_max_logit_diff: float = Field(
        2.0, gt=0, description="the merge fails when the largest |logit difference| between the merged "
        "checkpoint and the weights it merged into + the unmerged adapter (its self-check) exceeds this")

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not (Path(v).expanduser() / "adapter_config.json").exists():
            raise ValueError(f"'{v}' is not a PEFT adapter directory (no adapter_config.json)")
        return v


CalibrationSource = Literal["domain", "general"]


class CalibrationConfig(_Section):
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: Seed = 0
    source: CalibrationSource = Field(
        "domain", description="text the calibration windows are drawn from, for entries that do not say: domain "
        "(the domain train split) or general (the general train split, distinct from general_eval)")


class AWQOptions(_Section):
    duo_scaling: bool = Field(True, description="scale statistic from activations and weights (AutoAWQ's default)")
    clip: bool = Field(True, description="search a clipping range per group (all linears but q/k)")
    search_windows: int = Field(
        8, ge=1, description="calibration windows the block-output losses of the scale search run on; "
        "channel statistics and the clip search use all of them")


class ModuleOverride(_Section):
    """Bits and/or group size for the linears a `dynamic` key matches."""

    bits: Optional[Literal[2, 3, 4, 8]] = None
    group_size: Optional[int] = Field(None, description="columns per quantization group; -1 for one group per row")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v != -1 and v < 1:
            raise ValueError(f"group_size must be -1 or a positive number of columns, got {v}")
        return v

    @model_validator(mode="after")
    def _overrides_something(self) -> "ModuleOverride":
        if self.bits is None and self.group_size is None:
            raise ValueError("an override sets bits, group_size or both")
        return self


class ActivationStorage(_Section):
    """Where and how the layer engine keeps the calibration activations (one [windows, tokens,
    hidden] set, overwritten layer by layer). `pipeline.layerwise.placement` has the formula."""

    storage: Literal["auto", "device", "host"] = Field(
        "auto", description="device: resident on the compute device; host: in pinned host memory, streamed to "
        "the device a chunk of windows at a time (the same result, bit for bit); auto: device when the formula "
        "says they fit, else host. On the CPU both are host memory")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the activations are stored in between layers (computed in float32 either "
        "way); bfloat16 halves their memory and changes the result slightly (README: measured tolerance)")


class QuantizeEntry(_Section):
    name: str
    method: str = Field(description="a method of the registry (qlora_pipeline.methods): " + ", ".join(METHODS))
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="columns per quantization group; -1 for one group per row")
    sym: bool = False
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = Field(0.01, gt=0, lt=1)
    true_sequential: bool = True
    mse: bool = False
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the calibration forward passes, AWQ's search forwards included (autocast on "
        "the entry's device); weights, Hessians, AWQ's statistics and the solve stay float32; auto: float32")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the layer engine computes (layer weights, Hessians, the GPTQ/AWQ solve, the "
        "forwards): auto: cuda when present, else cpu; cuda requested on a machine without one is an error")
    activations: ActivationStorage = ActivationStorage()
    calibration_source: Optional[CalibrationSource] = Field(
        None, description="calibrated methods: domain or general train text for this entry's calibration windows; "
        "null: calibration.source")
    baseline: bool = Field(
        False, description="a reference entry (e.g. round-to-nearest, to show what calibration buys): evaluated "
        "and judged by evaluate.gate like the others, marked as a baseline in the report; its failing the gate "
        "does not fail the run")
    adapter_on_quantized_base: bool = Field(
        False, description="also quantize the original base model with this entry's method, settings and "
        "calibration windows and evaluate it with the float adapter on top, unmerged: artifact '<name>+adapter', "
        "the alternative to merge-then-requantize")
    dynamic: dict[str, ModuleOverride] = Field(
        default_factory=dict, description="mixed precision (methods rtn and gptq): regular expression -> {bits, "
        "group_size} for the linears whose full module name it matches from the start (e.g. '.*mlp\\.down_proj': "
        "{bits: 8}); the first matching key decides; written to the checkpoint as GPTQModel's `dynamic` mapping, "
        "which vLLM reads")
    awq: AWQOptions = AWQOptions()
    nf4: NF4Config = Field(default_factory=NF4Config, description="method nf4: block size and compute dtype of "
                           "the NF4 checkpoint (the same settings and defaults as the base's nf4 section)")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(f"'{v}' must be lowercase letters, digits, '-', '_' or '.' (it names the stage quantize-{v})")
        if v in ("base", "base-nf4", "merged", "qlora"):
            raise ValueError(f"'{v}' is reserved for an artifact of the pipeline itself")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"group_size must be -1 or a positive number of columns, got {v}")
        return v

    @field_validator("dynamic")
    @classmethod
    def _dynamic_keys(cls, v: dict) -> dict:
        for key in v:
            problem = module_overrides.key_problem(key)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}'; methods: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _fits_its_format(self) -> "QuantizeEntry":
        problems = format_problems(self)
        if problems:
            raise ValueError(problems[0])
        return self


class GateConfig(_Section):
    """Thresholds every quantized artifact must meet, in percent over the merged model."""

    max_domain_ppl_increase: Optional[float] = Field(None, ge=0, description="percent; null: no limit")
    max_general_ppl_increase: Optional[float] = Field(None, ge=0, description="percent; null: no limit")


class EvaluateConfig(_Section):
    max_domain_windows: Optional[int] = Field(None, ge=1, description="cap on domain_eval (test split) windows (null: all)")
    max_general_windows: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA; on the CPU bfloat16 where it computes bf16 natively (AVX-512 BF16, AMX), else float32"
    )
    prompts: list[str] = Field(default_factory=list, description="greedy generations, the same for every artifact")
    max_new_tokens: int = Field(48, ge=1)
    speed: bool = Field(True, description="measure prefill and decode throughput (batch 1)")
    decode_tokens: int = Field(32, ge=1, description="tokens decoded for the throughput measure")
    kv_fp8: bool = Field(
        False, description="also measure domain perplexity with keys (after RoPE) and values rounded through "
        "float8_e4m3fn, with scale 1.0 and with per-layer scales amax/448 calibrated on domain_train windows "
        "(off by default: two more passes over the domain windows per artifact)")
    kv_fp8_calibration_windows: int = Field(
        4, ge=1, description="domain_train windows (data.seq_len tokens, from the start of the split) whose K/V "
        "amax set the calibrated fp8 scales")
    qlora: bool = Field(
        False, description="also evaluate artifact 'qlora': the model as trained, the NF4 base with the float "
        "adapter on top, unmerged (the report compares it with the merged model)")
    gate: GateConfig = GateConfig()


class DeployConfig(_Section):
    """The report's memory plan (weights + KV cache) and the defaults of `pipeline memory`."""

    contexts: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        default_factory=lambda: [2048, 8192], min_length=1, description="tokens per sequence (prompt + generated) to plan for")
    batch_sizes: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 8, 32], min_length=1, description="concurrent sequences to plan for")
    kv_dtypes: list[Literal["bf16", "fp16", "fp8"]] = Field(
        default_factory=lambda: ["bf16", "fp8"], min_length=1, description="KV-cache element types to plan for")
    gpu_memory_gb: float = Field(24, gt=0, allow_inf_nan=False, description="the GPU's memory in GiB (a '24 GB' "
                                 "card holds 24 x 2^30 bytes): what weights + KV cache must fit")

    @field_validator("gpu_memory_gb", mode="before")
    @classmethod
    def _not_a_flag(cls, v):
        if isinstance(v, bool):
            raise ValueError("must be a number of GiB, not true/false")
        return v


class TrackingConfig(_Section):
    enabled: bool = True
    uri: Optional[str] = Field(None, description="MLflow tracking URI; null: MLflow's default (sqlite:///mlflow.db here)")
    experiment: str = "qlora-pipeline"


class CacheConfig(_Section):
    """The stage cache shared by run directories (`qlora_pipeline.stagecache`)."""

    enabled: bool = Field(
        True, description="take a stage's output from the cache when a run (in any run directory) already made it "
        "with the same fingerprint (settings, code, input content), and store every finished stage there; "
        "false: the cache is neither read nor written")
    dir: Optional[str] = Field(
        None, min_length=1, description="cache folder; null: stages/ in the project's cache folder ($QLP_CACHE, else "
        "$XDG_CACHE_HOME/qlora-pipeline, by default ~/.cache/qlora-pipeline); the environment variable "
        "QLP_STAGE_CACHE, when set, takes precedence")


class RunConfig(_Section):
    name: Optional[str] = Field(None, description="run name; default: the recipe file's stem")
    dir: str = Field("runs", min_length=1, description="parent folder of run directories")
    seed: Seed = Field(0, description="the seed of every seeded section that does not give its own: train.seed "
                      "(LoRA init, batch order), calibration.seed (which windows calibrate)")
    verify_inputs: bool = Field(
        True, description="hash the upstream files a stage reads against their manifests before it runs "
        "(an altered file is rebuilt first), and a stage cache entry's files before it is used; off only for huge "
        "models where hashing costs too much")
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @field_validator("name")
    @classmethod
    def _name_slug(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"'{v}' must start with a letter or digit, then letters, digits, '-', '_' or '.' "
                             "(it names a folder)")
        return v


SEEDED_SECTIONS = ("train", "calibration")  # the sections whose `seed` run.seed gives by default


class Recipe(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    nf4: NF4Config = Field(default_factory=NF4Config)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantize: list[QuantizeEntry] = Field(default_factory=list)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _run_seed_seeds_the_sections(cls, data: Any) -> Any:
        """run.seed is the seed of train and calibration where they give none (their own wins)."""
        given = data.get("run", {}).get("seed") if isinstance(data, dict) and isinstance(data.get("run"), dict) else None
        if given is None or isinstance(given, bool):
            return data  # absent: the sections' default, 0, is run.seed's
        try:  # as run.seed itself will read it (7.0 and "7" are 7)
            seed = _SEED.validate_python(given)
        except ValidationError:
            return data  # named at run.seed alone
        data = dict(data)
        for section in SEEDED_SECTIONS:
            own = data.get(section, {})
            if isinstance(own, dict) and "seed" not in own:
                data[section] = {**own, "seed": seed}
        return data

    @field_validator("quantize")
    @classmethod
    def _unique_quantize_names(cls, entries: list[QuantizeEntry]) -> list[QuantizeEntry]:
        names = [q.name for q in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:  # by entry index, as every other problem of an entry is named
            where = "; ".join(f"'{n}' at {', '.join(f'quantize.{i}.name' for i, m in enumerate(names) if m == n)}"
                              for n in dupes)
            raise ValueError(f"names must be unique (each names its stage and artifact); repeated: {where}")
        return entries

    @model_validator(mode="after")
    def _general_calibration_has_text(self) -> "Recipe":
        if self.data.general is None:
            for i, q in enumerate(self.quantize):
                if METHODS[q.method].calibrated and self.calibration_source(q) == "general":
                    key = f"quantize.{i}.calibration_source" if q.calibration_source else "calibration.source"
                    raise ValueError(f"{key}: general calibrates quantize entry '{q.name}' on the general train "
                                     "split, but data.general is null; give data.general or use domain")
        return self

    def calibration_source(self, entry: "QuantizeEntry") -> Optional[str]:
        """The text `entry`'s calibration windows come from (None: its method takes no calibration)."""
        if not METHODS[entry.method].calibrated:
            return None
        return entry.calibration_source or self.calibration.source


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping. PyYAML keeps the last
    one silently: a second `train:` section would drop the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:  # the mapping's own keys (a `<<` merge may repeat them)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first at line {seen[key]}); keep one, merging what "
                    "each holds", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _schema_at(loc: tuple, root: type[BaseModel] = Recipe) -> Optional[type[BaseModel]]:
    """The model class found by walking `loc` (field names and list indices) from `root`."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / list[X] / Union[...] -> the first pydantic model inside, else the annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "literal["))))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _schema_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f" Did you mean '{'.'.join(str(p) for p in loc[:-1] + (guess[0],))}'?" if guess else ""
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"{path}: unknown key.{hint} Known keys in {where}: {', '.join(known)}"
    if err["type"] == "model_type":  # a section given as something else: say so, not the class name
        section = _schema_at(loc)
        keys = f"; its keys: {', '.join(section.model_fields)}" if section else ""
        if err.get("input") is None:
            return f"{path}: empty section (nothing after '{loc[-1]}:'); give its keys or remove the line{keys}"
        return f"{path}: must be a section of keys, not a {_kind(err['input'])} ({err['input']!r}){keys}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{path}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError([f"--set '{text}': expected key.path=value"], source="--set")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise RecipeError([f"--set '{text}': empty key path"], source="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError([f"--set {key}: value is not valid YAML ({exc.__class__.__name__})"], source="--set") from None
    return parts, value


def _declared_kind(parts: list[str]) -> Optional[str]:
    """What the schema declares at a key path: "section", "list" or "value" (a scalar), or None
    when the path is unknown or the type is a union of kinds (the schema judges those)."""
    annotation: Any = Recipe
    for part in parts:
        annotation = _without_none(annotation)
        if get_origin(annotation) is list and part.isdigit():
            annotation = get_args(annotation)[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return None
    annotation = _without_none(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if get_origin(annotation) is list:
        return "list"
    if get_origin(annotation) is Union:
        return None
    return "value"


def _without_none(annotation: Any) -> Any:
    """Optional[X] -> X; other annotations unchanged."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "section"}.get(type(value), type(value).__name__)


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    """Set the key path `parts` of the raw recipe `data` to `value`, in place.

    Mappings are walked by key, lists by index (`quantize.0.group_size`) or `*` for every item
    (`quantize.*.group_size`). A key missing on
    the way (or null) becomes an empty mapping, so `--set train.steps=5` works on a recipe
    without a train section; the schema then validates the result.

    Raises:
        RecipeError: the path goes through a scalar (`model.source.x`), names a key of a list
            (`quantize.name`), or an index a list does not have; the message names the key
            path and the kind of value found there.
    """
    text = ".".join(parts)

    def fail(problem: str) -> RecipeError:
        return RecipeError([f"--set {text}: {problem}"], "--set")

    node: Any = data
    for i, part in enumerate(parts):
        here, last = ".".join(parts[: i + 1]), i == len(parts) - 1
        if isinstance(node, list):
            where = ".".join(parts[:i])
            if part == "*" and not last:  # every item: --set 'quantize.*.compute_dtype=bfloat16'
                if not node:
                    raise fail(f"{where} is an empty list, so '*' sets nothing; set the whole list instead: "
                               f"--set '{where}=[...]'")
                items = range(len(node))
                if parts[:i] == ["quantize"]:
                    # Every entry that reads the key: `quantize.*.compute_dtype` means the calibrated
                    # entries, not also a round-to-nearest one that would refuse it.
                    items = [k for k in items if not isinstance(node[k], dict) or
                             reads(str(node[k].get("method")), parts[i + 1])]
                    if not items:
                        raise fail(f"no entry of {where} reads {parts[i + 1]} (methods: "
                                   f"{', '.join(sorted({str(q.get('method')) for q in node if isinstance(q, dict)}))})")
                for k in items:  # a problem names the item: --set quantize.2.awq.x: ...
                    apply_override(data, parts[:i] + [str(k)] + parts[i + 1:], value)
                return
            if part.startswith("-") and part[1:].isdigit():  # a negative index
                raise fail(f"{where} has {len(node)} item(s): indices 0 to {len(node) - 1}, counted from the first")
            if not part.isdigit():
                # `quantize.bits` (no index) or `quantize.x.bits` (a placeholder for one): the index goes
                # where the placeholder is, or before the key.
                placeholder = not last and (len(part) == 1 or part.lower() in ("idx", "index") or part[0] in "<{[")
                rest = ".".join(parts[i + 1:] if placeholder else parts[i:])
                raise fail(f"{where} is a list; address an item by its index, e.g. {where}.0.{rest}, or every item "
                           f"with '*': {where}.*.{rest}")
            if int(part) >= len(node):
                raise fail(f"{where} has {len(node)} item(s), so there is no index {part}; "
                           f"set the whole list instead: --set '{where}=[...]'")
            if last:
                node[int(part)] = value
                return
            child = node[int(part)]
        else:
            if last:
                node[part] = value
                return
            child = node.get(part)
            if child is None:  # a section the recipe leaves out (or null): create it, if it is one
                declared = _declared_kind(parts[: i + 1])
                if declared == "list" or parts[i + 1].isdigit():
                    nxt = parts[i + 1]
                    raise fail(f"{here} is a list not given in this recipe, so it has no "
                               f"{f'item {nxt}' if nxt.isdigit() else repr(nxt)}; "
                               f"set the whole list instead: --set '{here}=[...]'")
                if declared == "value":
                    raise fail(f"{here} is a single value, not a section, so it has no key '{parts[i + 1]}'; "
                               f"set {here} itself: --set {here}=VALUE")
                child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise fail(f"{here} is a {_kind(child)} ({child!r}), not a section or list, so it has no key "
                       f"'{parts[i + 1]}'; set {here} itself: --set {here}=VALUE")
        node = child


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe.

    Returns:
        (the validated Recipe with run.name filled in, the raw dict after overrides).

    Raises:
        RecipeError: every problem found, each naming its key path.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        raise RecipeError([f"'{path}' is a folder, not a recipe file"
                           + (f"; the recipes in it: {', '.join(inside)}" if inside else "")], source=str(path))
    if not path.exists():
        raise RecipeError([f"recipe file '{path}' does not exist"], source=str(path))
    if not path.is_file():
        raise RecipeError([f"'{path}' is not a regular file; give a recipe .yaml file"], source=str(path))
    empty = RecipeError([f"recipe file '{path}' is empty; write its sections (see recipes/*.yaml), "
                         "or `{}` to run every default"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():  # checked before YAML, which refuses a tab even in a blank file
            raise empty
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"], source=str(path)) from None
    except UnicodeDecodeError:
        raise RecipeError(["not a UTF-8 text file; save it as UTF-8 (a YAML recipe is text)"], source=str(path)) from None
    except OSError as exc:
        raise RecipeError([f"cannot read it ({exc.strerror or exc})"], source=str(path)) from None
    if data is None:
        # An empty file (or only comments) is far more likely a mistake, such as a truncated
        # copy or the wrong file, than a request for the full default run; `{}` asks for that.
        raise empty
    if not isinstance(data, dict):
        raise RecipeError([f"top level must be a mapping of sections, got {type(data).__name__}"], source=str(path))
    for text in overrides:
        apply_override(data, *parse_override(text))
    data.setdefault("run", {})
    if isinstance(data["run"], dict) and data["run"].get("name") is None:
        data["run"]["name"] = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError([_format_error(e) for e in exc.errors()], source=str(path)) from None
    return recipe, data


_PARAM_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")


def flatten_settings(value: Any, leaf=str) -> dict[str, str]:
    """Nested settings as flat 'section.key' -> `leaf(value)` pairs; a list of mappings is
    keyed by each item's `name` (quantize entries) or index."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and not all(_PARAM_KEY.match(str(k)) for k in value):
            # a mapping keyed by user text (`dynamic`'s regular expressions): one value, as JSON,
            # since MLflow names may hold only letters, digits, '_', '-', '.', ' ' and '/'
            out[prefix] = json.dumps(value) if leaf is str else leaf(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{v.get('name', i)}", v)
        else:
            out[prefix] = leaf(value)

    walk("", value)
    return out


def flatten(recipe: Recipe) -> dict[str, str]:
    """The recipe as flat 'section.key' -> string pairs (MLflow params)."""
    return flatten_settings(recipe.model_dump(mode="json"))
