"""Stage `train`: LoRA adapters (peft) on the frozen NF4 base, on the domain train windows;
the eval loss every `eval_interval` steps is on the validation split (`domain_valid`).

Deterministic and resumable: the batch of every step is a pure function of (seed, step), and
every `save_interval` steps a checkpoint holds the adapter, optimizer, scheduler and RNG
states, written atomically and sealed with the size and sha256 of its files. After a crash the
same command continues from the newest checkpoint whose files still match that record (newer,
damaged ones are reported and removed) and ends with the adapter an uninterrupted run would
have produced.

Runs under `accelerate launch` (DDP): each rank takes its own micro-batches of the same
global step; only the main process writes checkpoints and outputs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora_pipeline import data
from qlora_pipeline.compute import DTYPES
from qlora_pipeline.dtypes import train_dtype_name
from qlora_pipeline.layerwise.checkpoints import load_nf4_model
from qlora_pipeline.errors import InputError, StageError
from qlora_pipeline.layerwise.families import family_for
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.lora import attach_lora
from qlora_pipeline.models import is_hub_source, resolve_model, stage_model
from qlora_pipeline.next_token_loss import next_token_loss
from qlora_pipeline.recipe import TRAIN_CHECKPOINTING, LoraConfig, TrainConfig
from qlora_pipeline.rundir import checkpoint_problems, fsync_dir, fsync_tree, is_sealed, seal_checkpoint
from qlora_pipeline.safe_state import load_state, save_state
from qlora_pipeline.scoring import summed_nll
from qlora_pipeline.stages.data import TOKENS_FILE
from qlora_kernels.int4_linear import dequantized_cache, fits_kept, training_weights
from qlora_kernels.nf4_linear import LinearNF4

logger = logging.getLogger(__name__)
TRAIN_LOG_FILE = "train_log.json"  # loss per step and validation loss per eval interval (the report plots it)

STEP_DIR = "step-{:07d}"
TRAINER_STATE = "trainer"  # optimizer, scheduler, RNG: trainer.json + trainer.safetensors
CHECKPOINT_FILES = ("adapter.safetensors", f"{TRAINER_STATE}.json", f"{TRAINER_STATE}.safetensors")


def train_device_dtype(cfg, nf4_compute_dtype: str) -> tuple[str, torch.dtype]:
    """Training compute: `auto` is NF4's compute dtype on CUDA, float32 on the CPU
    (`qlora_pipeline.dtypes.train_dtype_name`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, DTYPES[train_dtype_name(cfg.dtype, device, cuda_dtype=nf4_compute_dtype)]


class BatchOrder:
    """Sample indices of every (step, micro-batch, rank): epochs of seeded permutations."""

    def __init__(self, n_windows: int, seed: int, micro_batch: int, accumulation: int, world: int):
        self.n, self.seed, self.mb, self.accum, self.world = n_windows, seed, micro_batch, accumulation, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = ((step * self.accum + micro) * self.world + rank) * self.mb
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + self.mb)]

    def position(self, step: int) -> dict:
        consumed = step * self.accum * self.world * self.mb
        return {"samples_consumed": consumed, "epoch": consumed // self.n, "offset": consumed % self.n}


def make_optimizer(params, cfg, device: str):
    if cfg.optimizer == "paged_adamw_8bit" and device == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), "paged_adamw_8bit"
    if cfg.optimizer == "paged_adamw_8bit":
        logger.warning("train.optimizer paged_adamw_8bit needs CUDA; using torch AdamW on %s", device)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), "adamw"


def make_scheduler(optimizer, cfg):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, history: list, position: dict, keep: int) -> None:
    final = ckpt_dir / STEP_DIR.format(step)
    tmp = ckpt_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "adapter.safetensors"))
    save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "step": step, "history": history, "position": position}, tmp, TRAINER_STATE)
    seal_checkpoint(tmp, step=step)  # last: the record of its files makes it a checkpoint
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(ckpt_dir)
    for old in _sealed_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _sealed_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The step folders with a record of their files, oldest first (a `trainer.pt` pickle or a
    folder left by an older version has none: never loaded)."""
    return sorted(p for p in ckpt_dir.glob("step-*") if is_sealed(p))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest sealed checkpoint, its files unchecked (for messages; a resume uses `resume_point`)."""
    done = _sealed_checkpoints(ckpt_dir)
    return done[-1] if done else None


def resume_point(ckpt_dir: Path, discard: bool = True) -> Path | None:
    """The newest checkpoint whose files hash to its record; None: training starts over.

    Newer ones that are damaged (a file cut short or altered on disk) or incomplete are
    reported and, when `discard` (the main process), removed: loading one would fail with a
    bare library error, or worse, resume silently from altered weights.
    """
    candidates = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), reverse=True)
    for folder in candidates:
        problems = checkpoint_problems(folder, required=CHECKPOINT_FILES)
        if not problems:
            return folder
        logger.warning("train: checkpoint %s is damaged or incomplete (%s); %s", folder.name, "; ".join(problems[:3]),
                       "removed, trying an older one" if discard else "skipped")
        if discard:
            shutil.rmtree(folder, ignore_errors=True)
    if candidates:
        logger.warning("train: no intact checkpoint in %s; training starts over from step 0", ckpt_dir)
    return None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, list]:
    saved = load_file(str(path / "adapter.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    state = load_state(path, TRAINER_STATE)  # plain data only: a run directory never runs code
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["history"]


def _sort_target_modules(config_path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that changes from process to
    process; sorted, the same training gives the same bytes."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dequantized_cache(False)  # between steps: no layer keeps its dequantized weight (the whole model, in fp32 on a CPU)
def eval_loss(model, windows: torch.Tensor, batch_size: int, device: str) -> float:
    """Mean next-token NLL on the validation windows, the model back in training mode after."""
    model.eval()
    total, count = summed_nll(model, windows, batch_size, device)
    model.train()
    return total / count


def kept_layers(model, device: str, dtype: torch.dtype) -> list:
    """The NF4 layers whose dequantized weights stay between training steps: on the CPU (no
    kernel), all of them when they fit the budget together (SmolLM2-135M: 0.4 GB in float32;
    not an 8B's 28 GB), else none. The same values, so the same training, with no
    dequantization per step. Shared with scripts/train_memory_phases.py."""
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    return layers if device == "cpu" and layers and fits_kept(layers, dtype, torch.device(device)) else []


def trainable_model(base, lora: LoraConfig, cfg: TrainConfig):
    """The NF4 `base` with fresh LoRA adapters on the recipe's targets, gradient checkpointing as
    the recipe says, in training mode: (model, target module names). Shared with
    scripts/train_memory_phases.py, so its measurement trains what this stage trains."""
    family = family_for(base.config.model_type)
    targets = ([name.rsplit(".", 1)[-1] for name in family.linears]
               if lora.target_modules == "all-linear" else list(lora.target_modules))
    model = attach_lora(base, targets, lora.r, lora.alpha, lora.dropout)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, targets


def run(ctx: StageContext) -> StageResult:
    from accelerate import Accelerator

    # The checkpointing settings come as runtime settings (not fingerprinted).
    cfg = TrainConfig.model_validate({**ctx.config["train"], **{k: ctx.runtime[k] for k in TRAIN_CHECKPOINTING}})
    lora = LoraConfig.model_validate(ctx.config["lora"])
    model_cfg = stage_model(ctx.config, ctx.runtime)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, dtype = train_device_dtype(cfg, ctx.config["nf4_compute_dtype"])
    device = str(accelerator.device) if device == "cuda" else "cpu"
    streams = load_file(str(ctx.inputs["data"] / TOKENS_FILE))
    seq_len = cfg.seq_len or ctx.config["seq_len"]
    train_windows = data.windows(streams["domain_train"], seq_len)
    if train_windows.shape[0] < cfg.micro_batch_size:
        raise InputError(f"train.micro_batch_size: {cfg.micro_batch_size} exceeds the {train_windows.shape[0]} "
                         f"training windows of {seq_len} tokens; lower it or train.seq_len")
    # The validation split: the test split (domain_eval) stays unseen until the evaluate stages.
    eval_windows = data.windows(streams["domain_valid"], ctx.config["seq_len"], cfg.eval_windows)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    base = load_nf4_model(ctx.inputs["base"], dtype, device)
    model, targets = trainable_model(base, lora, cfg)
    # Hub ids stay ids (what users pass to from_pretrained); other sources name their local directory.
    model.peft_config["default"].base_model_name_or_path = (
        model_cfg.source if is_hub_source(model_cfg) else str(resolve_model(model_cfg)))
    optimizer, optimizer_name = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)
    scheduler = make_scheduler(optimizer, cfg)

    start_step, history = 0, []
    resume_from = resume_point(ctx.checkpoint_dir, discard=accelerator.is_main_process)
    if resume_from is not None:
        start_step, history = load_checkpoint(resume_from, model, optimizer, scheduler)
        logger.info("train: resuming after step %d from %s", start_step, resume_from.name)
    ddp_model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    order = BatchOrder(train_windows.shape[0], cfg.seed, cfg.micro_batch_size, cfg.gradient_accumulation,
                       accelerator.num_processes)
    tokens_per_step = cfg.micro_batch_size * cfg.gradient_accumulation * accelerator.num_processes * seq_len

    with training_weights(kept_layers(model, device, dtype)):
        bar = ctx.progress(range(start_step, cfg.steps), desc="train", unit="step", total=cfg.steps, initial=start_step,
                           disable=None if accelerator.is_main_process else True)
        for step in bar:
            t0 = time.time()
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation):
                batch = train_windows[order.indices(step, micro, accelerator.process_index)].to(device)
                last_micro = micro == cfg.gradient_accumulation - 1
                with contextlib.nullcontext() if last_micro else accelerator.no_sync(ddp_model):
                    loss = next_token_loss(ddp_model, model, batch)
                    if not torch.isfinite(loss):
                        last = latest_checkpoint(ctx.checkpoint_dir)
                        raise StageError(
                            f"non-finite training loss ({loss.item()}) at step {step + 1}; the last good "
                            f"checkpoint ({last.name if last else 'none'}) is kept. Lower train.learning_rate or "
                            "check the data."
                        )
                    accelerator.backward(loss / cfg.gradient_accumulation)
                step_loss += loss.item() / cfg.gradient_accumulation
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.num_processes > 1:
                step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="mean").item()
            # Timings go to MLflow only: the stage's output files hold what was computed, so the
            # same work gives the same bytes.
            record = {"step": step + 1, "loss": step_loss, "learning_rate": lr, "grad_norm": float(grad_norm)}
            speed = {"tokens_per_second": tokens_per_step / max(time.time() - t0, 1e-9)}
            if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
                record["eval_loss"] = eval_loss(model, eval_windows, cfg.micro_batch_size, device)
            history.append(record)
            if accelerator.is_main_process:
                ctx.metrics.log_metrics({**{k: v for k, v in record.items() if k != "step"}, **speed}, step=step + 1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
                if (step + 1) % cfg.save_interval == 0 and step + 1 < cfg.steps:
                    save_checkpoint(ctx.checkpoint_dir, step + 1, model, optimizer, scheduler, history,
                                    order.position(step + 1), cfg.keep_checkpoints)
            accelerator.wait_for_everyone()

    metrics = {"final_loss": history[-1]["loss"], "steps": float(cfg.steps), "tokens_seen": float(cfg.steps * tokens_per_step)}
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        metrics["final_eval_loss"] = evals[-1]
        metrics["final_eval_ppl"] = math.exp(evals[-1])
    if accelerator.is_main_process:
        model.save_pretrained(ctx.output_dir)
        _sort_target_modules(ctx.output_dir / "adapter_config.json")
        (ctx.output_dir / TRAIN_LOG_FILE).write_text(json.dumps({
            "history": history, "optimizer": optimizer_name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "processes": accelerator.num_processes, "target_modules": targets,
        }, indent=1))
    accelerator.free_memory()  # its references to the model and optimizer: the next stage may run in this process
    return StageResult(metrics=metrics, info={"optimizer": optimizer_name, "processes": accelerator.num_processes})

