"""What keeping the dequantized NF4 weights saves a CPU training step.

On the CPU (no Triton kernel) a QLoRA step dequantizes every NF4 linear twice, for the forward
and for the input gradient; the train stage keeps each layer's dequantized weight instead when
the whole model's fit the budget (`qlora_kernels.int4_linear.training_weights`). This trains
the run directory's NF4 base with the recipe's LoRA and train settings on its training windows,
from the same seed, once per mode and round (modes alternate: dequantize per step, kept), and
prints the median seconds per step (the first step of each round is a warm-up and not counted)
and the losses, which must be equal in both modes, step for step, or the script fails.

    python scripts/bench_train_step.py recipes/smollm2_domain.yaml RUN_DIR --steps 6 --rounds 2

Writes benchmarks/train_step.json. With `--compare loss` the two modes are instead the loss
as transformers computes it (every logit of the batch at once) and the stage's chunked loss
(`qlora_pipeline.next_token_loss`), both with the weights kept; their losses must agree to
1e-5 (float rounding order), and it writes benchmarks/train_step_loss.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

# mode -> (keep the dequantized weights, transformers' own loss)
MODES = {"weights": {"dequantize per step": (False, False), "kept": (True, False)},
         "loss": {"transformers loss": (True, True), "chunked loss": (True, False)}}


def train_steps(run_dir: Path, recipe, steps: int, keep: bool, transformers_loss: bool = False
                ) -> tuple[list[float], list[float]]:
    """(seconds per step, loss per step) of `steps` training steps from the recipe's seed."""
    from qlora_kernels.int4_linear import training_weights
    from qlora_kernels.nf4_linear import LinearNF4
    from qlora_pipeline import data
    from qlora_pipeline.layerwise.checkpoints import load_nf4_model
    from qlora_pipeline.next_token_loss import next_token_loss
    from qlora_pipeline.stages.data import TOKENS_FILE
    from qlora_pipeline.stages.train import make_optimizer, trainable_model

    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    base = load_nf4_model(run_dir / "base" / "output", torch.float32, "cpu")
    model, _ = trainable_model(base, recipe.lora, cfg)
    optimizer, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
    windows = data.windows(load_file(str(run_dir / "data" / "output" / TOKENS_FILE))["domain_train"],
                           cfg.seq_len or recipe.data.seq_len)
    seconds, losses = [], []
    with training_weights([m for m in model.modules() if isinstance(m, LinearNF4)] if keep else []):
        for step in range(steps):
            batch = windows[step * cfg.micro_batch_size:(step + 1) * cfg.micro_batch_size]
            t0 = time.perf_counter()
            loss = (model(input_ids=batch, labels=batch).loss if transformers_loss
                    else next_token_loss(model, model, batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
            losses.append(loss.item())
    return seconds, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", choices=sorted(MODES), default="weights")
    ap.add_argument("--out", default=None, help="default: benchmarks/train_step.json (train_step_loss.json for --compare loss)")
    args = ap.parse_args()
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe)[0]
    modes = MODES[args.compare]
    timed: dict[str, list[float]] = {m: [] for m in modes}
    losses: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for mode, (keep, transformers_loss) in modes.items():
            seconds, loss = train_steps(args.run_dir, recipe, args.steps, keep, transformers_loss)
            timed[mode] += seconds[1:]
            if losses.setdefault(mode, loss) != loss:
                sys.exit(f"{mode}: the losses differ between rounds")
    first, second = (losses[m] for m in modes)
    same = first == second if args.compare == "weights" else \
        all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(first, second))
    if not same:
        sys.exit(f"the modes trained differently: {losses}")
    rows = [{"mode": m, "median_step_s": round(statistics.median(timed[m]), 3), "steps_timed": len(timed[m])}
            for m in modes]
    ratio = rows[0]["median_step_s"] / rows[1]["median_step_s"]
    last = list(modes)[-1]
    tokens = recipe.train.micro_batch_size * (recipe.train.seq_len or recipe.data.seq_len)
    print(f"training step of {tokens} tokens, float32 on the CPU, {torch.get_num_threads()} threads")
    for row in rows:
        print(f"  {row['mode']:<20} {row['median_step_s']:7.3f} s  ({row['steps_timed']} steps)")
    agree = "equal" if args.compare == "weights" else "within 1e-5"
    print(f"  {last} is {ratio:.2f}x faster; losses {agree} step for step ({', '.join(f'{v:.4f}' for v in losses[last])})")
    out = args.out or ("benchmarks/train_step.json" if args.compare == "weights" else "benchmarks/train_step_loss.json")
    Path(out).write_text(json.dumps({
        "benchmark": "train_step", "recipe": args.recipe, "compare": args.compare, "tokens_per_step": tokens,
        "rows": rows, "speedup": round(ratio, 3), "losses": {m: losses[m] for m in modes},
        "threads": torch.get_num_threads(),
        "machine": platform.machine(), "python": platform.python_version()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
