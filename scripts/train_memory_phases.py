"""Where the train stage's peak RSS comes from: the resident memory, split into anonymous and
file-backed pages, and the high-water mark after each phase of what `train` does (load the NF4
base, attach LoRA, a forward, a backward, an optimizer step), on a run directory's NF4 base.

    python scripts/train_memory_phases.py RUN_DIR/base/output [--steps 1] [--seq-len 256]
        [--transformers-loss] [--out benchmarks/train_memory_phases.json]

File-backed pages are the checkpoint's tensors that stay memory-mapped (the NF4 weights): they
count in RSS once touched, but the kernel can drop and re-read them (clean page cache), unlike
anonymous memory. A sampler thread records the highest RSS and the phase it fell in. glibc
keeps freed blocks for reuse, so RSS also counts what the heap kept; with
MALLOC_MMAP_THRESHOLD_=131072 in the environment RSS follows the live tensors (recorded). The
LoRA, gradient-checkpointing, optimizer and compute-dtype settings are the run directory's own
(its run.json's recipe), applied by the train stage's own code, and so is the batch: the
recipe's micro-batch of train.seq_len tokens (random ids: memory does not depend on them) unless
--batch / --seq-len say otherwise. As in the stage, on the CPU the NF4 layers keep their
dequantized weights between steps when they fit the budget (`train.kept_layers`).

Besides RSS, it adds up what autograd saves for the backward during each forward (unique
storages: the LM head's vocabulary-wide tensors, and the rest), and with
--eval-windows N measures the stage's in-loop validation (`eval_loss` on N windows of the
recipe's data.seq_len) after the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

import torch

GIB = 2**30


def _status() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 / GIB
            for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="an NF4 base: <run dir>/base/output")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the recipe's train.seq_len)")
    ap.add_argument("--batch", type=int, default=None, help="windows per step (default: train.micro_batch_size)")
    ap.add_argument("--eval-windows", type=int, default=0, help="then the in-loop validation on this many windows")
    ap.add_argument("--transformers-loss", action="store_true",
                    help="the loss as transformers computes it (every logit of the batch at once), not the "
                         "stage's chunked one (next_token_loss): the before of a before/after")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/train_memory_phases.json"))
    args = ap.parse_args()

    from qlora_pipeline.layerwise.checkpoints import load_nf4_model
    from qlora_pipeline.recipe import LoraConfig, TrainConfig
    from qlora_kernels.int4_linear import training_weights
    from qlora_pipeline.next_token_loss import next_token_loss
    from qlora_pipeline.stages.train import eval_loss, kept_layers, make_optimizer, train_device_dtype, trainable_model

    run_json = args.base.resolve().parents[1] / "run.json"
    if not run_json.is_file():
        raise SystemExit(f"{run_json}: not found; pass a run directory's NF4 base, RUN_DIR/base/output")
    recipe = json.loads(run_json.read_text())["recipe"]
    lora = LoraConfig.model_validate(recipe["lora"])
    train = TrainConfig.model_validate(recipe["train"])
    device, dtype = train_device_dtype(train, recipe["nf4"]["compute_dtype"])
    seq_len = args.seq_len or train.seq_len or recipe["data"]["seq_len"]
    batch_size = args.batch or train.micro_batch_size

    peak = {"gib": 0.0, "phase": "start"}
    phase = ["start"]

    def sample() -> None:
        while True:
            rss = _status()["VmRSS"]
            if rss > peak["gib"]:
                peak.update(gib=rss, phase=phase[0])
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    rows = []

    def mark(done: str, next_phase: str) -> None:
        row = {"after": done, **{k: round(v, 3) for k, v in _status().items()},
               "sampled_peak_gib": round(peak["gib"], 3), "sampled_peak_phase": peak["phase"]}
        rows.append(row)
        print(f"{done:<16} RSS {row['VmRSS']:6.2f}  anon {row['RssAnon']:6.2f}  file {row['RssFile']:6.2f}  "
              f"high-water {row['VmHWM']:6.2f} GiB  (sampled peak {row['sampled_peak_gib']:.2f} in {row['sampled_peak_phase']})",
              flush=True)
        phase[0] = next_phase

    mark("imports", "load")
    model = load_nf4_model(args.base, dtype, device)
    mark("load", "attach lora")
    model, targets = trainable_model(model, lora, train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(trainable, train, device)
    batch = torch.randint(0, min(49152, model.config.vocab_size), (batch_size, seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)
    kept = kept_layers(model, device, dtype)  # the train stage's rule
    vocab = model.config.vocab_size
    saved_rows = []

    def saved_tally() -> tuple[dict, Callable]:
        """Bytes autograd saves for the backward, unique storages, split into the LM head's
        vocabulary-wide tensors (logits, log-probabilities) and the rest."""
        seen, kinds = set(), {"lm head (vocab-wide)": 0, "rest": 0}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            if key not in seen:
                seen.add(key)
                kinds["lm head (vocab-wide)" if t.dim() and t.shape[-1] == vocab else "rest"] += t.untyped_storage().nbytes()
            return t

        return kinds, pack

    mark("attach lora", "forward 1")
    with training_weights(kept):
        for step in range(1, args.steps + 1):
            kinds, pack = saved_tally()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = (model(input_ids=batch, labels=batch).loss if args.transformers_loss
                        else next_token_loss(model, model, batch))
            saved_rows.append({"step": step, **{k: round(v / GIB, 3) for k, v in kinds.items()},
                               "total": round(sum(kinds.values()) / GIB, 3)})
            print(f"saved for backward, step {step}: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in kinds.items())
                  + f" GiB; total {sum(kinds.values()) / GIB:.3f} GiB", flush=True)
            mark(f"forward {step}", f"backward {step}")
            loss.backward()
            del loss
            mark(f"backward {step}", f"optimizer {step}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mark(f"optimizer {step}", f"forward {step + 1}" if step < args.steps else "eval")
        if args.eval_windows:
            windows = torch.randint(0, min(49152, vocab), (args.eval_windows, recipe["data"]["seq_len"]),
                                    generator=torch.Generator().manual_seed(1))
            eval_loss(model, windows, train.micro_batch_size, device)
            mark(f"eval ({args.eval_windows} x {recipe['data']['seq_len']})", "end")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "train_memory_phases", "base": str(args.base),
                                    "layers": model.config.num_hidden_layers, "seq_len": seq_len,
                                    "batch": batch_size, "kept_weights": bool(kept), "saved_for_backward_gib": saved_rows,
                                    "loss": "transformers" if args.transformers_loss else "chunked (next_token_loss)",
                                    "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                                    "dtype": str(dtype).replace("torch.", ""), "lora": lora.model_dump(),
                                    "target_modules": targets, "gradient_checkpointing": train.gradient_checkpointing,
                                    "trainable_parameters": sum(p.numel() for p in trainable),
                                    "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
