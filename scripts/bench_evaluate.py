"""Where an evaluation stage spends its time, per part, on the recipe's base model.

An `evaluate-<artifact>` stage loads the artifact, computes the domain and general perplexity,
measures batch-1 throughput and greedy generations of the recipe's prompts. This times each
part with the stage's own functions (`qlora_pipeline.stages.evaluate`, `qlora_pipeline.scoring`),
in the recipe's evaluation dtype and on its windows, in one process:

- load: the checkpoint into the model class (as the stage does);
- domain / general perplexity: every window's forward and its summed next-token NLL; each is
  split into the decoder body's forward (`model.model`, the floor an exact perplexity cannot go
  under) and the rest (the LM head's matmul, the float32 cast and the cross-entropy);
- throughput: the median-of-3 prefill and decode measure after a warm-up;
- generations: the recipe's prompts, greedy.

Each part runs `--repeats` times and the fastest is kept (the machine is noisy); the perplexities
must come out bit-identical every time (else the script fails). Stop other work on the machine
first: two jobs on two cores stall each other's threads.

    python scripts/bench_evaluate.py RUN_DIR [--recipe recipes/smollm2_domain.yaml] [--repeats 2]
        [--out benchmarks/evaluate_parts.json]

RUN_DIR needs its `data` stage done (`pipeline run RECIPE --run-dir RUN_DIR --only data`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int):
    """(fastest seconds, result of the last run) of `fn()` over `repeats` runs; results must agree."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if result is not None and isinstance(out, tuple) and out != result:
            raise SystemExit(f"repeated runs disagree: {result} vs {out}")
        result = out
    return best, result


@torch.no_grad()
def body_forward(model, windows: torch.Tensor, batch_size: int, device: str) -> None:
    """The decoder body over the windows as the perplexity batches them: no LM head, no loss."""
    for start in range(0, windows.shape[0], batch_size):
        model.model(input_ids=windows[start: start + batch_size].to(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_domain.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "evaluate_parts.json")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from qlora_pipeline import data
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import EvaluateConfig, load_recipe
    from qlora_pipeline.scoring import eval_device_dtype, perplexity
    from qlora_pipeline.stages.data import TOKENS_FILE
    from qlora_pipeline.stages.evaluate import generations, throughput

    recipe, _ = load_recipe(args.recipe)
    cfg: EvaluateConfig = recipe.evaluate
    device, dtype = eval_device_dtype(cfg)
    seq_len = recipe.data.seq_len
    streams = load_file(str(args.run_dir / "data" / "output" / TOKENS_FILE))
    domain = data.windows(streams["domain_eval"], seq_len, cfg.max_domain_windows)
    general = data.windows(streams["general_eval"], seq_len, cfg.max_general_windows)
    source = resolve_model(recipe.model)
    quiet = lambda it, **kw: it  # noqa: E731 (no progress bars)

    parts: dict[str, float] = {}
    parts["load"], model = timed(lambda: load_hf_model(source, dtype, device), args.repeats)
    results = {}
    for name, windows in (("domain", domain), ("general", general)):
        parts[f"{name} perplexity"], results[f"{name}_ppl"] = timed(
            lambda: perplexity(model, windows, cfg.batch_size, device, quiet, ""), args.repeats)
        parts[f"{name} perplexity: body forward"], _ = timed(
            lambda: body_forward(model, windows, cfg.batch_size, device), args.repeats)
    if cfg.speed:
        parts["throughput"], _ = timed(lambda: throughput(model, domain[:1], cfg.decode_tokens, device), args.repeats)
    if cfg.prompts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        parts["generations"], _ = timed(
            lambda: generations(model, tokenizer, cfg.prompts, cfg.max_new_tokens, device), args.repeats)

    stage_parts = [p for p in parts if ": " not in p]
    total = sum(parts[p] for p in stage_parts)
    print(f"{'part':<36} {'seconds':>8} {'share':>6}")
    for part, seconds in parts.items():
        share = f"{100 * seconds / total:5.1f}%" if part in stage_parts else ""
        print(f"{part:<36} {seconds:8.2f} {share:>6}")
    print(f"{'sum of the parts':<36} {total:8.2f}")
    floor = parts["domain perplexity: body forward"] + parts["general perplexity: body forward"]
    print(f"perplexity over the body-forward floor: "
          f"{(parts['domain perplexity'] + parts['general perplexity']) / floor:.2f}x")
    row = {"recipe": str(args.recipe.relative_to(REPO) if args.recipe.is_relative_to(REPO) else args.recipe),
           "artifact": "base", "device": device, "dtype": str(dtype).replace("torch.", ""),
           "domain_windows": list(domain.shape), "general_windows": list(general.shape),
           "batch_size": cfg.batch_size, "decode_tokens": cfg.decode_tokens, "prompts": len(cfg.prompts),
           "max_new_tokens": cfg.max_new_tokens, "repeats": args.repeats, "seconds": parts,
           "sum_seconds": total, "perplexity_over_body_floor": (parts["domain perplexity"] + parts["general perplexity"]) / floor,
           **{k: v[0] for k, v in results.items()}}
    meta = {"benchmark": "evaluate_parts", "machine": {"cpu": platform.processor() or platform.machine(),
                                                       "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                                       "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, **row}, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
