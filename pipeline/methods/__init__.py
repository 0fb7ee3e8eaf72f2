"""The quantization methods, one registry entry each, and the recipe-side rules they share.

An entry names the module that quantizes a layer (and, for AWQ, transforms it first), the
packed format it ships in (`formats`: packing, `quantization_config`, loading) and whether
it needs calibration activations. Adding a method is one entry here and one module beside
this file (a new packed format adds its format module to FORMATS); the `quantize-<name>`
stage, the evaluation and the benchmark scripts read the registry and nothing else.

This module imports no torch: `validate`, `plan` and `status` check recipes with it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

from qlora_pipeline.errors import InputError
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.methods import dynamic


@dataclass(frozen=True)
class Format:
    name: str
    module: str  # packs a quantized linear, restores it, writes the quantization_config and config files
    loader: str  # "module:function" loading a checkpoint of this format as it ships, (dir, dtype, device)


@dataclass(frozen=True)
class Method:
    name: str
    implementation: str          # module with `quantizer(entry, dtype)` and `transform(entry, family, checkpoint_dir, dtype, search_dir)`
    format: str                  # a key of FORMATS: how the quantized layers are packed, described and loaded
    calibrated: bool             # needs calibration activations (the `calibrate` stage)
    hessian_passes: bool = True  # one capture pass per sequential group; False: one pass per layer (metrics only)
    options: tuple[str, ...] = ()  # entry sections this method reads besides the common settings
    # A search whose per-layer result the method applies, done once in its own stage for every
    # entry with the same search settings (`search_settings`): "awq" or None.
    search: Optional[str] = None
    # The search stage quantizes every layer exactly as this method does, so it publishes those
    # layers and this method's stage only assembles them (`methods.checkpoint.checkpoint_from_layers`).
    assembles_search_layers: bool = False
    # A method of one bit width and settings of its own (its options), e.g. NF4: it reads none of COMMON_SETTINGS.
    fixed_bits: Optional[int] = None
    # Takes per-module bits and group sizes (`dynamic`, qlora_pipeline.methods.dynamic). AWQ's
    # search chooses scales for one bit width and group size per layer, so awq and awq+gptq do not.
    module_overrides: bool = False
    # Common settings (COMMON_SETTINGS) this method does not read: set in a recipe they would
    # change nothing, so the recipe is refused rather than run as if they had.
    unread: tuple[str, ...] = ()

    @property
    def common_settings(self) -> bool:
        """Reads the common settings of the grouped integer formats (bits, group_size, sym, ...)."""
        return self.fixed_bits is None

    def code_modules(self) -> tuple[str, ...]:
        """The modules quantizing with this method runs, imported by name (the quantize stage's
        code hash includes them)."""
        return (self.implementation, FORMATS[self.format].module)

    def loader_module(self) -> str:
        return FORMATS[self.format].loader.split(":")[0]

    def module(self) -> ModuleType:
        return importlib.import_module(self.implementation)

    def format_module(self) -> ModuleType:
        return importlib.import_module(FORMATS[self.format].module)

    def loader(self) -> Callable:
        module, _, function = FORMATS[self.format].loader.partition(":")
        return getattr(importlib.import_module(module), function)


_INT4_LOADER = "qlora_pipeline.layerwise.checkpoints:load_int4_model"
FORMATS = {f.name: f for f in (
    Format("gptq", "qlora_pipeline.methods.gptq_format", _INT4_LOADER),
    Format("awq-gemm", "qlora_pipeline.methods.awq_format", _INT4_LOADER),
    Format("bnb-nf4", "qlora_pipeline.methods.nf4_format", "qlora_pipeline.layerwise.checkpoints:load_nf4_model"),
    Format("bnb-int8", "qlora_pipeline.methods.int8_format", "qlora_pipeline.layerwise.checkpoints:load_bnb_model"),
)}

METHODS: dict[str, Method] = {m.name: m for m in (
    # Round-to-nearest has no calibration forwards, no Hessian and no column order.
    Method("rtn", "qlora_pipeline.methods.rtn", "gptq", calibrated=False, module_overrides=True,
           unread=("desc_act", "static_groups", "damp_percent", "true_sequential", "compute_dtype")),
    Method("gptq", "qlora_pipeline.methods.gptq", "gptq", calibrated=True, module_overrides=True),
    # AWQ alone uses the Hessians only for the error metrics: one capture pass per layer.
    # Where AWQ searches was measured on domain_valid (scripts/compare_awq_search.py, README "Where
    # AWQ searches"): on the inputs AWQ's own quantized layers produce, for AWQ alone 2.5 points
    # better than on the float model, and for AWQ+GPTQ as good as either other design; so one
    # search stage of that kind serves both methods (with the same AWQ settings).
    # AWQ rounds its scaled weights to nearest in their natural column order, clipped by its own
    # search (awq.clip) rather than an MSE grid.
    Method("awq", "qlora_pipeline.methods.awq", "awq-gemm", calibrated=True, hessian_passes=False, options=("awq",),
           search="awq", assembles_search_layers=True,
           unread=("desc_act", "static_groups", "damp_percent", "true_sequential", "mse")),
    Method("awq+gptq", "qlora_pipeline.methods.awq_gptq", "gptq", calibrated=True, options=("awq",), search="awq"),
    # NF4 of the merged model, as the base stage writes it: 4-bit, block size from the entry's nf4 section.
    Method("nf4", "qlora_pipeline.methods.nf4", "bnb-nf4", calibrated=False, hessian_passes=False, options=("nf4",),
           fixed_bits=4),
    # LLM.int8: int8 weights with one absmax per output row; bitsandbytes computes with them.
    Method("int8", "qlora_pipeline.methods.int8", "bnb-int8", calibrated=False, hessian_passes=False, fixed_bits=8),
)}
OPTION_SECTIONS = frozenset(s for m in METHODS.values() for s in m.options)
# The settings of the grouped integer formats and of the calibration forwards (compute_dtype),
# which methods with a fixed bit width (uncalibrated) do not read.
COMMON_SETTINGS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "true_sequential", "mse",
                   "compute_dtype")


def method(name: str) -> Method:
    return METHODS[name]


def format_problems(entry) -> list[str]:
    """What the entry's packed format cannot store (recipe-time rules, no model needed)."""
    method = METHODS[entry.method]
    if entry.calibration_source is not None and not method.calibrated:
        return [f"method {method.name} takes no calibration windows; remove calibration_source"]
    if entry.dynamic and not method.module_overrides:
        takes = ", ".join(m.name for m in METHODS.values() if m.module_overrides)
        return [f"method {method.name} takes no per-module overrides (dynamic); methods that do: {takes}"]
    # Refused when set to something other than the default: a default written out (as the
    # quantize stage's own config is, `relevant_settings`) changes nothing and misleads no one.
    for section in sorted(OPTION_SECTIONS - set(method.options)):
        if _set_away_from_default(entry, section):
            readers = ", ".join(m.name for m in METHODS.values() if section in m.options)
            return [f"method {method.name} does not read the {section} section (methods that do: {readers}); remove it"]
    unread = [k for k in method.unread if _set_away_from_default(entry, k)]
    if unread:
        reads = ", ".join(k for k in COMMON_SETTINGS if k not in method.unread)
        return [f"method {method.name} does not use {', '.join(unread)} (it reads {reads}); remove "
                f"{'it' if len(unread) == 1 else 'them'}"]
    if not method.common_settings:
        unused = [k for k in COMMON_SETTINGS
                  if k in entry.model_fields_set and not (k == "bits" and entry.bits == method.fixed_bits)]
        if unused:
            own = f"; its settings: {', '.join(method.options)}" if method.options else ""
            return [f"method {method.name} is {method.fixed_bits}-bit and does not use {', '.join(unused)}{own}"]
        return []
    if method.format != "awq-gemm":
        return []
    problems = []
    if entry.bits != 4:
        problems.append(f"AWQ GEMM checkpoints are 4-bit only, got bits={entry.bits}")
    if entry.sym:
        problems.append("AWQ GEMM checkpoints store zero points: use sym: false (or method: awq+gptq)")
    if entry.group_size == -1:
        problems.append("AWQ GEMM checkpoints need a group size (e.g. 128), not -1")
    return problems


def reads(method_name: str, key: str) -> bool:
    """Whether an entry of this method reads `key` (a setting or an options section): False
    for a common setting it leaves unread or a section of another method's options. Unknown
    methods and other keys: True (the schema judges them)."""
    method = METHODS.get(method_name)
    if method is None:
        return True
    if key in OPTION_SECTIONS:
        return key in method.options
    if key in COMMON_SETTINGS:
        return method.common_settings and key not in method.unread
    return True


def _set_away_from_default(entry, field: str) -> bool:
    return field in entry.model_fields_set and getattr(entry, field) != \
        type(entry).model_fields[field].get_default(call_default_factory=True)


def values_per_word_run(bits: int) -> int:
    """Rows that fill whole int32 words: 8 for 4-bit, 16 for 2-bit, 4 for 8-bit, 32 for 3-bit."""
    return 32 // math.gcd(bits, 32)


def divisors_hint(n: int, bits: int) -> list[int]:
    pf = values_per_word_run(bits)
    return [d for d in range(8, n + 1) if n % d == 0 and d % pf == 0]


def check_shapes(entry, config: dict, key: str) -> None:
    """A group size that does not divide a linear's input size, or a `dynamic` key that matches
    no linear, is a recipe error naming the key that set it."""
    if not METHODS[entry.method].common_settings:  # NF4's blocks (over the flattened weight) and int8's rows fit any shape
        return
    family = family_for(config["model_type"])
    in_features = family.linear_in_features(config)
    linears = family.linear_names(config)  # (full name, name within the layer)
    names = [name for name, _ in linears]
    for dkey in entry.dynamic:
        if not any(dynamic.matching_key({dkey: None}, n) for n in names):
            raise InputError(f"{key}.dynamic['{dkey}']: matches no quantized linear. Keys match a full module name "
                             f"from its start, e.g. {names[-1]}: write '.*{_example_suffix(names[-1])}' for every layer's")
    checked = set()
    for name, linear in linears:
        dkey = dynamic.matching_key(entry.dynamic, name)
        values = dynamic.override(entry.dynamic, name)
        bits, group = values.get("bits", entry.bits), values.get("group_size", entry.group_size)
        n, size = in_features[linear], dict(family.linear_inputs)[linear]
        if (bits, group, n) in checked:
            continue
        checked.add((bits, group, n))
        where = f"{key}.dynamic['{dkey}']" if dkey is not None else key
        if group != -1 and n % group:
            common = [d for d in divisors_hint(n, bits) if all(m % d == 0 for m in in_features.values())]
            default = dkey is None and "group_size" not in entry.model_fields_set  # a value the user never wrote
            raise InputError(f"{where}.group_size: {group}{' (the default)' if default else ''} does not divide the "
                             f"model's {size} {n}"
                             f"{f' ({name})' if dkey is not None else ''}; group sizes that work: "
                             f"{', '.join(map(str, common[:12]))} or -1")
        pf = values_per_word_run(bits)
        if n % pf:
            raise InputError(f"{where}.bits: {bits}-bit packing needs sizes divisible by {pf}; {size} is {n}")
    if METHODS[entry.method].format == "awq-gemm":
        heads = int(config.get("num_attention_heads", 1))
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        kv = int(config.get("num_key_value_heads", heads)) * head_dim
        sizes = {"hidden_size": int(config["hidden_size"]), "intermediate_size": int(config["intermediate_size"])}
        for what, n in {**sizes, "key/value size": kv}.items():
            if n % 8:
                raise InputError(f"{key}.method: the AWQ GEMM layout packs 8 output columns per word; "
                                 f"the model's {what} is {n}; use method: gptq")


def _example_suffix(name: str) -> str:
    """`mlp\\.down_proj` from `model.layers.29.mlp.down_proj`: a pattern for one linear in every layer."""
    return re.escape(".".join(name.split(".")[-2:]))


def calibration_stage_name(source: str) -> str:
    """The stage that draws calibration windows from `source`'s train split: `calibrate` (domain)
    or `calibrate-general`."""
    return "calibrate" if source == "domain" else f"calibrate-{source}"


def search_settings(entry) -> dict:
    """What an entry's search depends on (besides the merged model and the calibration set):
    entries that agree on it share one search stage. `entry.calibration_source` is resolved
    (the recipe's default filled in) where stages are built."""
    return {"bits": entry.bits, "group_size": entry.group_size, **entry.awq.model_dump(mode="json"),
            "calibration_source": entry.calibration_source}


def search_stage_name(entry, onto_base: bool = False) -> str:
    """`awq-search-w<bits>g<group>` on domain calibration windows, `...-general` on general ones;
    `...-base`: the search of the original base model (`adapter_on_quantized_base`)."""
    suffix = "" if entry.calibration_source in (None, "domain") else f"-{entry.calibration_source}"
    return f"{METHODS[entry.method].search}-search-w{entry.bits}g{entry.group_size}{suffix}{'-base' if onto_base else ''}"


def search_stage_names(entries, onto_base: bool = False) -> dict[str, str]:
    """Entry name -> its search stage, for the entries whose method searches. Entries that
    agree on bits, group size and calibration source share `search_stage_name` when they agree
    on every search and engine setting too; where they do not, each distinct search is its own
    stage, named with a short digest of its settings (`awq-search-w4g64-1a2b3c`)."""
    groups: dict[str, list] = {}
    for q in entries:
        if METHODS[q.method].search:
            groups.setdefault(search_stage_name(q, onto_base), []).append(q)
    names = {}
    for shared, served in groups.items():
        keys = {q.name: json.dumps({**search_settings(q), **engine_settings(q)}, sort_keys=True) for q in served}
        for q in served:
            names[q.name] = shared if len(set(keys.values())) == 1 else \
                f"{shared}-{hashlib.sha256(keys[q.name].encode()).hexdigest()[:6]}"
    return names


ADAPTER_SUFFIX = "+adapter"  # artifact `<name>+adapter`: the original base quantized like `<name>`, adapter on top


def relevant_settings(entry) -> dict:
    """The entry's settings that change this method's output (its stage fingerprint): AWQ's
    options do not concern rtn or gptq entries, the grouped-integer settings not nf4 or int8,
    the calibration source (resolved where stages are built) no uncalibrated method."""
    method = METHODS[entry.method]
    settings = entry.model_dump(mode="json")
    settings.pop("adapter_on_quantized_base", None)  # which stages exist, not what one writes
    settings.pop("baseline", None)  # how the report counts the verdict, not what the stage writes
    if not entry.dynamic:  # absent, as before the setting existed: the same work keeps its fingerprint
        settings.pop("dynamic", None)
    if not method.calibrated:
        settings.pop("calibration_source", None)
    for section in OPTION_SECTIONS - set(method.options):
        settings.pop(section, None)
    if not method.common_settings:
        for key in COMMON_SETTINGS:
            settings.pop(key, None)
    # The device as written ("auto") is not what decides the result: the stage registry adds the
    # device it resolves to. Where the activations are stored (device or host) gives the same
    # bytes (tests/pipeline/test_engine_device.py); their dtype does not, and matters only to a
    # method that has activations.
    settings.pop("device", None)
    if METHODS[entry.method].calibrated:
        settings["activations"] = {"dtype": entry.activations.dtype}
    else:
        settings.pop("activations", None)
    return settings


def engine_settings(entry) -> dict:
    """What a shared search stage computes with (the device setting, the forwards' and the
    activations' dtypes): the entries it serves must agree on it."""
    return {"device": entry.device, "compute_dtype": entry.compute_dtype, "activations_dtype": entry.activations.dtype}
