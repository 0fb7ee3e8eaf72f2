"""Choose the default recipe's training settings on the validation split, never the test split.

For each candidate (steps, learning rate, LoRA rank, training window) this trains the adapter
with the pipeline's own `train` stage in a scratch run directory and reads its final eval
loss, which the train stage measures on `domain_valid` windows. The same windows are scored
for the original base model and the NF4 base without adapter, so the table says how much of
NF4's loss the adapter recovers and whether the fine-tune beats the original base on text it
has not seen. The test split (`domain_eval`) is not read.

    python scripts/tune_finetune.py recipes/smollm2_domain.yaml \
        --candidate steps=30,lr=1e-3 --candidate steps=60,lr=3e-4 ...

Writes benchmarks/tune_finetune.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = {"steps": "train.steps", "lr": "train.learning_rate", "r": "lora.r", "alpha": "lora.alpha",
        "seq_len": "train.seq_len", "warmup": "train.warmup_steps", "mb": "train.micro_batch_size"}


def pipeline(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", *args], cwd=REPO, check=True)


def base_losses(run_dir: Path, recipe, windows: int) -> dict[str, float]:
    """Validation loss of the original base and of the NF4 base, on the train stage's windows."""
    import torch
    from safetensors.torch import load_file

    from qlora_pipeline import data
    from qlora_pipeline.layerwise.checkpoints import load_hf_model, load_nf4_model
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.stages.train import eval_loss

    streams = load_file(str(run_dir / "data" / "output" / "tokens.safetensors"))
    valid = data.windows(streams["domain_valid"], recipe.data.seq_len, windows)
    out = {}
    for name, load in (("base", lambda: load_hf_model(resolve_model(recipe.model), torch.float32, "cpu")),
                       ("base-nf4", lambda: load_nf4_model(run_dir / "base" / "output", torch.float32, "cpu"))):
        model = load()
        out[name] = eval_loss(model, valid, recipe.train.micro_batch_size, "cpu")
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--candidate", action="append", required=True,
                    help="comma-separated key=value with keys " + ", ".join(KEYS))
    ap.add_argument("--eval-windows", type=int, default=16, help="validation windows scored (data.seq_len tokens each)")
    ap.add_argument("--run-dir", default="runs/tune_finetune")
    ap.add_argument("--out", default="benchmarks/tune_finetune.json")
    args = ap.parse_args()

    from qlora_pipeline.recipe import load_recipe

    common = ["--run-dir", args.run_dir, "--set", "tracking.enabled=false", "--set", "quantize=[]",
              "--set", f"train.eval_windows={args.eval_windows}"]
    pipeline("run", args.recipe, *common, "--only", "data")
    pipeline("run", args.recipe, *common, "--only", "base")
    recipe, _ = load_recipe(args.recipe, [s for s in common[2:] if s != "--set"])
    run_dir = REPO / args.run_dir
    reference = base_losses(run_dir, recipe, args.eval_windows)
    rows = []
    for cand in args.candidate:
        settings = dict(kv.split("=", 1) for kv in cand.split(","))
        sets = [x for k, v in settings.items() for x in ("--set", f"{KEYS[k]}={v}")]
        if "steps" in settings:
            sets += ["--set", f"train.eval_interval={settings['steps']}"]
        t0 = time.time()
        pipeline("run", args.recipe, *common, *sets, "--only", "train")
        manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
        loss = manifest["metrics"]["final_eval_loss"]
        rows.append({"candidate": cand, "valid_loss": loss, "valid_ppl": math.exp(loss),
                     "vs_base_pct": 100 * (math.exp(loss - reference["base"]) - 1), "seconds": time.time() - t0})
        print(f"{cand:<40} valid ppl {math.exp(loss):8.3f}  vs base {rows[-1]['vs_base_pct']:+6.2f}%", flush=True)
        result = {"recipe": args.recipe, "eval_windows": args.eval_windows, "split": "domain_valid",
                  "base_valid_ppl": math.exp(reference["base"]), "base_nf4_valid_ppl": math.exp(reference["base-nf4"]),
                  "candidates": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # after each candidate: a long sweep can stop
    print(f"\nbase {result['base_valid_ppl']:.3f}, base-nf4 {result['base_nf4_valid_ppl']:.3f} (domain_valid, "
          f"{args.eval_windows} windows)")
    for r in sorted(rows, key=lambda r: r["valid_loss"]):
        print(f"  {r['candidate']:<40} {r['valid_ppl']:8.3f}  {r['vs_base_pct']:+6.2f}%  {r['seconds']:6.0f} s")


if __name__ == "__main__":
    main()
