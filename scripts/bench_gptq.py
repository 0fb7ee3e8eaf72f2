"""GPTQ, AWQ, AWQ+GPTQ and round-to-nearest on SmolLM2 with the exact protocol of docs/baselines.md.

Quantizes the fp32 SmolLM2-135M (all seven linears of every layer, 4-bit asymmetric) through
the same sequential layer engine and packed format as the `quantize-<name>` stage, evaluates
the *packed* checkpoint, and prints per method: perplexity, its increase over fp32, wall time,
and per-layer time. Writes JSON for comparison across versions.

    python scripts/bench_gptq.py [--group-size 128] [--samples 128] [--methods rtn gptq awq awq+gptq] [--out FILE]

Protocol (docs/baselines.md#protocol): topics of pydoc_data.topics sorted by key, eval = i % 5 == 0, each
split joined with blank lines and tokenized without special tokens; 33 eval windows of 512;
calibration = 512-token windows at offsets torch.randint(0, len(train) - 511, (128,), seed 0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from qlora_pipeline.methods import METHODS

REPO = Path(__file__).resolve().parent.parent
BASELINE = {"fp32": 13.19, "rtn-g128": 17.65, "rtn-g64": 17.06, "gptq-g128-actorder-static": 14.74,
            "gptq-g64-actorder-static": 14.73, "awq-g64": 14.88}


def protocol_data(tokenizer):
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 == 0)
    train = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 != 0)
    eval_ids = torch.tensor(tokenizer(held, add_special_tokens=False)["input_ids"])
    train_ids = torch.tensor(tokenizer(train, add_special_tokens=False)["input_ids"])
    return eval_ids, train_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=list(METHODS))
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from qlora_pipeline.data import windows
    from qlora_pipeline.layerwise.checkpoints import load_hf_model
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig, QuantizeEntry
    from qlora_pipeline.scoring import perplexity

    model_dir = resolve_model(ModelConfig())
    tok = AutoTokenizer.from_pretrained(model_dir)
    eval_ids, train_ids = protocol_data(tok)
    eval_windows = windows(eval_ids, 512)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train_ids) - 512 + 1, (128,), generator=gen)[: args.samples]
    calib = torch.stack([train_ids[s : s + 512] for s in starts.tolist()])
    no_progress = lambda it, **kw: it

    rows = []
    fp32 = load_hf_model(model_dir, torch.float32, "cpu")
    ppl, _ = perplexity(fp32, eval_windows, 4, "cpu", no_progress, "fp32")
    del fp32
    rows.append({"method": "fp32", "ppl": ppl, "seconds": 0.0})
    gs = args.group_size  # 128 leaves SmolLM2's 576-wide inputs a 64-column last group, as in docs/baselines.md
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            ckpt, out = tmp / "ckpt", tmp / "out"
            ckpt.mkdir()
            out.mkdir()
            layer_times: list[float] = []
            last = [time.time()]

            def on_layer(i, metrics):
                now = time.time()
                layer_times.append(now - last[0])
                last[0] = now

            # The same entry a recipe would hold, through the same registry and code as the stage.
            entry = QuantizeEntry(name=method.replace("+", "-"), method=method, bits=4, group_size=gs,
                                  desc_act=args.act_order, static_groups=args.static_groups,
                                  true_sequential=args.true_sequential, damp_percent=args.damp_percent,
                                  compute_dtype="float32", awq={"search_windows": 8})  # peers measure in fp32
            t0 = time.time()
            last[0] = t0
            quantize_checkpoint(model_dir, calib, entry, torch.float32, ckpt, out, no_progress, on_layer)
            seconds = time.time() - t0
            model = METHODS[method].loader()(out, torch.float32, "cpu")
            ppl, _ = perplexity(model, eval_windows, 4, "cpu", no_progress, method)
            rows.append({"method": method, "ppl": ppl, "seconds": seconds, "layer_seconds": layer_times})

    base = rows[0]["ppl"]
    print(f"group size {gs}, {args.samples} calibration windows, act_order={args.act_order}, "
          f"static_groups={args.static_groups}, true_sequential={args.true_sequential}")
    print(f"{'method':<9} {'ppl':>8} {'increase':>9} {'seconds':>8} {'s/layer':>8}")
    for r in rows:
        r["increase_percent"] = 100 * (r["ppl"] / base - 1)
        per_layer = sum(r.get("layer_seconds", [0])) / max(len(r.get("layer_seconds", [])), 1)
        print(f"{r['method']:<9} {r['ppl']:>8.3f} {r['increase_percent']:>+8.1f}% {r['seconds']:>8.1f} {per_layer:>8.2f}")
    out_path = args.out or REPO / "benchmarks" / f"gptq_smollm2_g{gs}_n{args.samples}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"benchmark": "gptq_smollm2_protocol", "group_size": gs, "samples": args.samples,
                                    "act_order": args.act_order, "static_groups": args.static_groups,
                                    "true_sequential": args.true_sequential, "cpus": os.cpu_count(),
                                    "machine": platform.machine(), "torch": torch.__version__,
                                    "reference_baselines": BASELINE, "rows": rows}, indent=2))
    print(f"written {out_path}")


if __name__ == "__main__":
    main()
