"""A quantized checkpoint's evaluation forwards on the CPU: load, then the domain and general
perplexity of a run directory's recipe windows, each timed.

On the CPU a GPTQ, AWQ or NF4 linear dequantizes its packed weight to the compute dtype when it is
called; the dequantized weights are kept between calls up to a budget (`QLP_DEQUANT_CACHE_GB`,
default a quarter of the host's RAM) and the linears past it dequantize at every call. On a
large model (the Llama-3-8B rehearsal: 32 layers, 5.3 GB of packed weights) that makes the
unpacking part of every forward, so its speed is the evaluation's speed. This script times it
on a finished quantize stage's checkpoint, with whichever `qlora_pipeline` the interpreter
imports: run it once with this checkout's environment and once with an older checkout's to
compare two versions of the packing code on the same checkpoint and windows (same session,
one after the other, nothing else running). The perplexities must agree between the versions
when their dequantization is bit-identical.

    python scripts/bench_quantized_eval.py RECIPE RUN_DIR --entry gptq-w4g128 [--dtype bfloat16]
        [--label new] [--out FILE]

RUN_DIR is RECIPE's run directory with `data` and `quantize-<entry>` done (`--entry base-nf4`:
the NF4 base, `base` done); the windows are the
recipe's evaluation windows (`data.seq_len`, `evaluate.max_domain_windows`,
`evaluate.max_general_windows`, `evaluate.batch_size`, read with the pipeline's own recipe loader).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--entry", required=True, help="the quantize entry's name, e.g. gptq-w4g128, or base-nf4")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--label", default="", help="a name for the code version measured")
    parser.add_argument("--out", type=Path, default=None, help="append the row to this JSON list")
    args = parser.parse_args()

    import qlora_pipeline
    from safetensors.torch import load_file

    from qlora_pipeline import data
    from qlora_pipeline.methods import METHODS
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.scoring import perplexity

    if args.entry == "base-nf4":
        from qlora_pipeline.layerwise.checkpoints import load_nf4_model as loader

        checkpoint = args.run_dir / "base" / "output"
    else:
        checkpoint = args.run_dir / f"quantize-{args.entry}" / "output"
        loader = METHODS[json.loads((checkpoint / "quantization.json").read_text())["method"]].loader()
    recipe, _ = load_recipe(args.recipe)
    seq_len, ev = recipe.data.seq_len, recipe.evaluate
    streams = load_file(str(args.run_dir / "data" / "output" / "tokens.safetensors"))
    dtype = getattr(torch, args.dtype)
    quiet = lambda it, **kw: it  # noqa: E731

    code_dir = Path(qlora_pipeline.__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(code_dir), *a], capture_output=True, text=True).stdout  # noqa: E731
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pipeline", "qlora_kernels", "quant").strip()
    commit = git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if dirty else "")
    row = {"label": args.label, "code": commit, "code_dir": str(code_dir), "entry": args.entry,
           "dtype": args.dtype, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "dequant_cache_gb": os.environ.get("QLP_DEQUANT_CACHE_GB", "default (a quarter of RAM)")}
    t0 = time.perf_counter()
    model = loader(checkpoint, dtype, "cpu")
    row["load_seconds"] = time.perf_counter() - t0
    for split, cap in (("domain", ev.max_domain_windows), ("general", ev.max_general_windows)):
        windows = data.windows(streams[f"{split}_eval"], seq_len, cap)
        t0 = time.perf_counter()
        ppl, tokens = perplexity(model, windows, ev.batch_size, "cpu", quiet, split)
        row[f"{split}_seconds"] = time.perf_counter() - t0
        row[f"{split}_ppl"], row[f"{split}_windows"] = ppl, list(windows.shape)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # system time: mostly page faults on fresh temporaries
    row.update(peak_rss_gib=usage.ru_maxrss / 2**20, cpu_user_seconds=usage.ru_utime,
               cpu_system_seconds=usage.ru_stime, minor_page_faults=usage.ru_minflt)
    print(json.dumps(row, indent=1))
    if args.out:
        rows = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
