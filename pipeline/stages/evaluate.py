"""Stages `evaluate-<artifact>`: one artifact's quality, size, speed and generations.

Perplexity = exp(summed next-token NLL over tokens 1..L-1 of every non-overlapping window /
number of predicted tokens); each window is an independent forward. The artifact is loaded
as it ships (NF4 through our `LinearNF4`, GPTQ/AWQ through `LinearInt4`), not as a float
imitation. Also: size on disk, load time, peak memory while evaluating (CUDA: peak allocated;
CPU: peak resident memory above what the process held before loading), prefill and decode
throughput at batch 1 on the evaluation device, and greedy generations of the recipe's prompts;
for the report's memory plan, the checkpoint's tensor bytes and its KV-cache shape. With
`evaluate.kv_fp8`, the domain perplexity with an fp8 KV cache (`qlora_pipeline.kv_fp8`), its
per-layer scales calibrated on domain_train windows (never the test split). Where it was computed
(processor, threads, library versions: `qlora_pipeline.environment`) is recorded beside the figures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from qlora_pipeline import data, memory_plan, rundir
from qlora_pipeline.environment import compute_environment
from qlora_pipeline.layerwise.checkpoints import dir_size, load_hf_model, load_nf4_model, read_config
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.methods import METHODS
from qlora_pipeline.models import resolve_model, stage_model
from qlora_pipeline.recipe import EvaluateConfig
from qlora_pipeline.scoring import cache_argument, eval_device_dtype, perplexity_of, returned_cache, window_nlls
from qlora_pipeline.stages.data import TOKENS_FILE
from qlora_pipeline.stages.quantize import SUMMARY_FILE as QUANTIZATION_SUMMARY

METRICS_FILE = "metrics.json"  # one artifact's measurements, what the report reads



def release_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).
    What earlier stages of the process freed stays resident otherwise, and an evaluation that
    reuses it grows the resident set less than one that does not (`scripts/bench_peak_memory.py`:
    the same evaluation repeated in one process reads less the second time without this)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


class PeakMemory:
    """Peak memory of a block: CUDA's peak allocated bytes, or on the CPU the peak resident set
    size above the level at entry, sampled every 5 ms (the process also holds torch itself),
    the heap that earlier work freed handed back first (`release_freed_heap`), so the figure
    is what the block itself needs, whatever ran before it in the process."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            release_freed_heap()
            self._start = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self._start)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self._start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def throughput(model, prompt: torch.Tensor, decode_tokens: int, device: str, repeats: int = 3) -> dict[str, float]:
    """Batch-1 prefill tokens/s (one forward of `prompt` [1, L]) and decode tokens/s (greedy
    steps with the KV cache after a 16-token prompt); medians of `repeats` runs after a warm-up."""
    prompt = prompt.to(device)
    cache_name = cache_argument(model)
    prefill, decode = [], []
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=prompt)
        _sync(device)
        if r:
            prefill.append(prompt.shape[1] / (time.perf_counter() - t0))
        out = model(input_ids=prompt[:, :16], use_cache=True)
        past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_name: past})
            past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        if r:
            decode.append(decode_tokens / (time.perf_counter() - t0))
    return {"prefill_tokens_per_second": statistics.median(prefill), "decode_tokens_per_second": statistics.median(decode)}


@torch.no_grad()
def generations(model, tokenizer, prompts: list[str], max_new_tokens: int, device: str) -> list[dict[str, str]]:
    """Greedy continuations of each prompt (no chat template: the same raw text for every artifact)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append({"prompt": prompt, "completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def _scored(metrics: dict, split: str, model, windows: torch.Tensor, cfg: EvaluateConfig, device: str,
            progress: Callable, artifact: str) -> list[float]:
    """Score `windows` of `split`: its perplexity and predicted tokens into `metrics`; each
    window's summed NLL returned."""
    nlls = window_nlls(model, windows, cfg.batch_size, device, progress, f"{artifact}: {split} ppl")
    metrics[f"{split}_ppl"] = perplexity_of(nlls, windows.shape[1])
    metrics[f"{split}_tokens"] = windows.shape[0] * (windows.shape[1] - 1)
    return nlls.tolist()


def make_stage(artifact: str, loader: Callable[[StageContext, torch.dtype, str], tuple[object, Path]]):
    """A stage function evaluating `artifact`; `loader(ctx, dtype, device)` returns (model, its
    directory) or (model, its directory, more files of the artifact: an unmerged adapter's)."""

    def run(ctx: StageContext) -> StageResult:
        settings = dict(ctx.config["evaluate"])
        seq_len = settings.pop("seq_len")
        cfg = EvaluateConfig.model_validate(settings)
        device, dtype = eval_device_dtype(cfg)
        streams = load_file(str(ctx.inputs["data"] / TOKENS_FILE))
        memory = PeakMemory(device).__enter__()
        t0 = time.time()
        model, artifact_dir, *more = loader(ctx, dtype, device)
        load_seconds = time.time() - t0
        extra_files = more[0] if more else []  # an unmerged adapter's weights: part of the artifact
        metrics = {"size_bytes": float(dir_size(artifact_dir) + sum(f.stat().st_size for f in extra_files)),
                   "load_seconds": round(load_seconds, 3),
                   "weights_bytes": memory_plan.checkpoint_tensor_bytes(artifact_dir)
                   + sum(memory_plan.safetensors_bytes(f) for f in extra_files)}
        producer = rundir.read_json(artifact_dir.parent / rundir.MANIFEST) or {}  # a stage output's manifest
        if (artifact_dir / QUANTIZATION_SUMMARY).is_file() and "stage_seconds" in producer.get("metrics", {}):
            # What making this artifact took: its quantize stage, and the AWQ search it applied
            # (a stage of its own, shared by the entries that apply it, but part of the cost of each).
            # Timings, like the producer's own seconds: read beside the producer's stage folder.
            searched = [rundir.read_json(artifact_dir.parent.parent / stage / rundir.MANIFEST) or {}
                        for stage in producer.get("inputs", {}) if "-search-" in stage]
            search_seconds = sum(m.get("metrics", {}).get("stage_seconds", 0.0) for m in searched)
            metrics["quantize_seconds"] = producer["metrics"]["stage_seconds"] + search_seconds
            if searched:
                metrics["search_seconds"] = search_seconds
        domain = data.windows(streams["domain_eval"], seq_len, cfg.max_domain_windows)
        # Each window's NLL is kept (float64 sums, a few hundred bytes): the report's paired
        # intervals compare two artifacts window by window (`qlora_pipeline.paired`).
        extra = {"kv_shape": memory_plan.attention(read_config(artifact_dir))._asdict()}
        extra["domain_window_nll"] = _scored(metrics, "domain", model, domain, cfg, device, ctx.progress, artifact)
        if cfg.kv_fp8:
            from qlora_pipeline.kv_fp8 import fp8_kv_perplexities

            calibration = data.windows(streams["domain_train"], seq_len, cfg.kv_fp8_calibration_windows)
            fp8, extra["kv_fp8_scales"] = fp8_kv_perplexities(model, domain, calibration, cfg.batch_size, device,
                                                              ctx.progress, artifact)
            metrics.update(fp8)
        if "general_eval" in streams:
            general = data.windows(streams["general_eval"], seq_len, cfg.max_general_windows)
            extra["general_window_nll"] = _scored(metrics, "general", model, general, cfg, device, ctx.progress,
                                                  artifact)
        if cfg.speed:
            metrics.update(throughput(model, domain[:1], cfg.decode_tokens, device))
        texts = []
        if cfg.prompts:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
            texts = generations(model, tokenizer, cfg.prompts, cfg.max_new_tokens, device)
        memory.__exit__(None, None, None)
        metrics["peak_memory_bytes"] = memory.peak
        metrics = {k: float(v) for k, v in metrics.items()}
        result = {"artifact": artifact, "device": device, "dtype": str(dtype).replace("torch.", ""), **metrics,
                  **extra, "generations": texts,
                  "environment": compute_environment(device, torch.get_num_threads(),
                                                     torch.cuda.get_device_name() if device == "cuda" else None)}
        (ctx.output_dir / METRICS_FILE).write_text(json.dumps(result, indent=2))
        return StageResult(metrics=metrics, info={"artifact_dir": str(artifact_dir)})

    return run


def evaluation_stage(artifact: str, loader: str):
    """The stage evaluating `artifact`, loaded by this module's function `loader` (the
    registry names both as data: `graph.StageRef`)."""
    return make_stage(artifact, globals()[loader])


def quantized_evaluation_stage(name: str, with_adapter: bool = False):
    """The stage evaluating quantize entry `name`'s checkpoint (`quantized_loader`)."""
    return make_stage(name, quantized_loader(name, with_adapter))


def load_original_base(ctx: StageContext, dtype: torch.dtype, device: str):
    src = resolve_model(stage_model(ctx.config, ctx.runtime))
    return load_hf_model(src, dtype, device), src


def load_base_nf4(ctx: StageContext, dtype: torch.dtype, device: str):
    src = ctx.inputs["base"]
    return load_nf4_model(src, dtype, device), src


def load_merged(ctx: StageContext, dtype: torch.dtype, device: str):
    src = ctx.inputs["merge"]
    return load_hf_model(src, dtype, device), src


def quantized_loader(name: str, with_adapter: bool = False):
    """The loader of artifact `name` (`quantize-<name>`'s checkpoint); `with_adapter`: with the
    float adapter on top, unmerged (`<entry>+adapter`)."""
    def load(ctx: StageContext, dtype: torch.dtype, device: str):
        src = ctx.inputs[f"quantize-{name}"]
        method = METHODS[json.loads((src / QUANTIZATION_SUMMARY).read_text())["method"]]
        model = method.loader()(src, dtype, device)
        if not with_adapter:
            return model, src
        adapter_dir = attach_adapter(model, ctx, device)
        return model, src, [adapter_dir / ADAPTER_WEIGHTS]

    return load


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_dir(ctx: StageContext) -> Path:
    """The adapter the merge merges: `merge.adapter`, or the train stage's output."""
    return Path(ctx.config["adapter"]).expanduser() if "adapter" in ctx.config else ctx.inputs["train"]


def attach_adapter(model, ctx: StageContext, device: str) -> Path:
    """Put the recipe's LoRA adapter on `model` unmerged (`adapter.attach_unmerged`); its directory."""
    from qlora_pipeline.adapter import Adapter, attach_unmerged

    path = adapter_dir(ctx)
    attach_unmerged(model, Adapter(path), device)
    return path


def load_qlora(ctx: StageContext, dtype: torch.dtype, device: str):
    """Artifact `qlora`: the model as trained, the NF4 base (`LinearNF4`) + the float adapter, unmerged."""
    src = ctx.inputs["base"]
    model = load_nf4_model(src, dtype, device)
    return model, src, [attach_adapter(model, ctx, device) / ADAPTER_WEIGHTS]
