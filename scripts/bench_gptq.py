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
from functools import partial
from pathlib import Path

import torch

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
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq", "awq", "awq+gptq"])
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from qlora_pipeline.layerwise.checkpoints import load_hf_model, load_int4_model, read_config, read_tensors, weight_map
    from qlora_pipeline.data import windows
    from qlora_pipeline.layerwise.families import LLAMA
    from qlora_pipeline.layerwise.engine import quantize_sequentially
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig
    from qlora_pipeline.layerwise.shards import REST_SHARD, save_atomic, assemble_shards
    from qlora_pipeline.stages.evaluate import perplexity
    from qlora_pipeline.layerwise.awq_search import AWQSettings, make_transform
    from qlora_pipeline.stages.quantize import _awq_result, _linear_result, _restore
    from qlora_quant.gptq import gptq_quantize, rtn_quantize

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

            transform = None
            if method.startswith("awq"):
                transform = make_transform(LLAMA, AWQSettings(4, gs, True, True, 8), ckpt, torch.float32)
            if method == "rtn":
                fn = lambda n, W, H: _linear_result(rtn_quantize(W, 4, gs, False, scale_dtype=torch.float16), 4, None)
                ids = None
            elif method == "awq":
                fn = lambda n, W, H: _awq_result(rtn_quantize(W, 4, gs, False, scale_dtype=torch.float16))
                ids = calib
            else:
                fn = lambda n, W, H: _linear_result(gptq_quantize(
                    W, H, 4, gs, False, args.act_order, args.static_groups, args.damp_percent,
                    scale_dtype=torch.float16), 4, H)
                ids = calib
            t0 = time.time()
            last[0] = t0
            n_layers = quantize_sequentially(model_dir, ids, LLAMA, torch.float32, ckpt, fn, partial(_restore, bits=4),
                                             args.true_sequential and method != "awq", no_progress, on_layer,
                                             transform_layer=transform)
            seconds = time.time() - t0
            wmap = weight_map(model_dir)
            rest = [n for n in wmap if not n.startswith("model.layers.")]
            save_atomic(read_tensors(wmap, rest), ckpt / REST_SHARD)
            assemble_shards(ckpt, out, n_layers)
            config = read_config(model_dir)
            config["quantization_config"] = (
                {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": "gemm"}
                if method == "awq" else
                {"quant_method": "gptq", "bits": 4, "group_size": gs, "checkpoint_format": "gptq_v2"})
            (out / "config.json").write_text(json.dumps(config))
            model = load_int4_model(out, torch.float32, "cpu")
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
