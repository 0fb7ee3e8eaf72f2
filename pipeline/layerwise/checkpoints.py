"""Reading and writing HF checkpoints tensor by tensor, and loading artifacts for evaluation.

The NF4 checkpoint uses bitsandbytes' serialization (`P.weight` + `P.weight.<quant state>`)
and a `quantization_config` that transformers reads; we load it back through our own
`LinearNF4`, so evaluation measures exactly the bytes that ship.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from qlora_pipeline.compute import DTYPES
from qlora_pipeline.errors import InputError, StageError
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.methods import dynamic
from qlora_pipeline.models import read_config  # noqa: F401  (the one config.json reader; re-exported for the stages)
from qlora_quant.nf4 import QUANT_STATE_KEY, NF4Tensor, nf4_from_serialized
from qlora_kernels.nf4_linear import LinearNF4

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single-file checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
            return {name: model_dir / fname for name, fname in mapping.items()}
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or no weight_map table
            raise InputError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of tensor "
                             "names to files); re-save the checkpoint with save_pretrained") from None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: no safetensors weights")
    out = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for name in st.keys():
                out[name] = f
    return out


def read_tensors(wmap: dict[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Load only `names`, grouped by file, without reading the rest of the checkpoint."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(wmap[n], []).append(n)
    out = {}
    for f, ns in by_file.items():
        try:
            with safe_open(f, "pt") as st:
                for n in ns:
                    out[n] = st.get_tensor(n)
        except Exception as exc:
            raise StageError(f"cannot read {f} ({type(exc).__name__}: {exc}); the file is damaged") from exc
    return out


def read_prefix(wmap: dict[str, Path], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under a module prefix ('model.layers.3.'), keyed relative to it."""
    names = [n for n in wmap if n.startswith(prefix)]
    return {n[len(prefix):]: t for n, t in read_tensors(wmap, names).items()}




def is_nf4_state(tensor_name: str) -> bool:
    """A quant-state tensor of an NF4 weight: bitsandbytes names them `<module>.weight.<part>`."""
    return ".weight." in tensor_name


def nf4_modules(wmap: dict[str, Path], prefix: str = "") -> set[str]:
    """The modules under `prefix` whose weight is stored in NF4."""
    return {n.split(".weight.", 1)[0] for n in wmap if n.startswith(prefix) and is_nf4_state(n)}


def nf4_tensor_names(wmap: dict[str, Path], module: str) -> list[str]:
    """The packed weight of NF4 module `module` and its quant-state tensors."""
    return [n for n in wmap if n == f"{module}.weight" or n.startswith(f"{module}.weight.")]


def read_nf4(wmap: dict[str, Path], module: str) -> NF4Tensor:
    return nf4_from_serialized(read_tensors(wmap, nf4_tensor_names(wmap, module)), f"{module}.weight")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


def bnb_quantization_config(nf4_cfg) -> dict:
    """The `quantization_config` transformers writes for NF4 + double quant."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[nf4_cfg.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8,
    ).to_dict()


def is_bnb_4bit(config: dict) -> bool:
    """True for a checkpoint already saved in bitsandbytes' 4-bit serialization (common on the hub)."""
    q = config.get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def empty_model(config_dict: dict, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    # Parameters on the meta device (no memory), buffers such as rotary inv_freq real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def load_hf_model(model_dir: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def load_bnb_model(model_dir: Path, dtype: torch.dtype, device: str):
    """A bitsandbytes-quantized checkpoint through transformers + bitsandbytes themselves (LLM.int8,
    whose arithmetic is bitsandbytes'): its float tensors in `dtype`."""
    import warnings

    from transformers import AutoModelForCausalLM

    # bitsandbytes warns on every int8 matmul that it casts its float32/bfloat16 input to float16.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device).eval()


def load_nf4_model(model_dir: Path, dtype: torch.dtype, device: str):
    """Build the model with `LinearNF4` layers from a bitsandbytes-serialized NF4 checkpoint."""
    config = read_config(model_dir)
    model = empty_model(config, dtype)
    wmap = weight_map(model_dir)
    prefixes = sorted(nf4_modules(wmap))
    if not prefixes:
        raise InputError(f"{model_dir}: no NF4 weights (no '*.weight.{QUANT_STATE_KEY}' tensors)")
    quant_names = set()
    for prefix in prefixes:
        quant_names.update(nf4_tensor_names(wmap, prefix))
        bias = read_tensors(wmap, [f"{prefix}.bias"])[f"{prefix}.bias"] if f"{prefix}.bias" in wmap else None
        quant_names.update([f"{prefix}.bias"] if bias is not None else [])
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearNF4(read_nf4(wmap, prefix), bias))
    return _load_the_rest(model, model_dir, wmap, quant_names, set(prefixes), dtype, device)


def load_int4_model(model_dir: Path, dtype: torch.dtype, device: str):
    """Build the model with `LinearInt4` layers from a packed GPTQ (v1 or v2) or AWQ GEMM checkpoint."""
    from qlora_kernels.int4_linear import LinearInt4
    from qlora_quant.packing import AWQPacked, GPTQPacked

    config = read_config(model_dir)
    qcfg = config.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method == "awq" and str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise InputError(f"{model_dir}: AWQ version '{qcfg.get('version')}' is not supported (only 'gemm')")
    if method not in ("gptq", "awq"):
        raise InputError(f"{model_dir}: not a GPTQ or AWQ checkpoint (quantization_config.quant_method={method})")
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    per_module = qcfg.get("dynamic") or {}  # GPTQModel's per-module overrides (qlora_pipeline.methods.dynamic)
    unsupported = [key for key in per_module if dynamic.key_problem(key)]
    if unsupported:
        raise InputError(f"{model_dir}: quantization_config.dynamic {dynamic.key_problem(unsupported[0])}")
    v1 = qcfg.get("checkpoint_format", "gptq") == "gptq"
    model = empty_model(config, dtype)
    wmap = weight_map(model_dir)
    prefixes = sorted(n[: -len(".qweight")] for n in wmap if n.endswith(".qweight"))
    used = set()
    for prefix in prefixes:
        keys = ("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales")
        names = [f"{prefix}.{k}" for k in keys]
        bias = [f"{prefix}.bias"] if f"{prefix}.bias" in wmap else []
        t = read_tensors(wmap, names + bias)
        used.update(t)
        b = t.get(f"{prefix}.bias")
        if method == "gptq":
            module_bits = int(dynamic.override(per_module, prefix).get("bits", bits))
            module = LinearInt4.from_gptq(GPTQPacked(*(t[n] for n in names)), module_bits, v1, b)
        else:
            module = LinearInt4.from_awq(AWQPacked(*(t[n] for n in names)), b)
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return _load_the_rest(model, model_dir, wmap, used, set(prefixes), dtype, device)


def _load_the_rest(model, model_dir: Path, wmap: dict[str, Path], used: set[str], quantized: set[str],
                   dtype: torch.dtype, device: str):
    """Load every tensor not in `used` (the quantized modules' own) into `model`, in `dtype`;
    every parameter but a tied head and the quantized modules' float weights must get one."""
    rest = read_tensors(wmap, [n for n in wmap if n not in used])
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rest.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = family_for(model.config.model_type).unexplained_missing(missing, quantized)
    if unexpected or missing:
        raise StageError(f"{model_dir}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise StageError(f"{model_dir}: parameters without weights: {leftover[:3]}")
    return model.to(device).eval()
