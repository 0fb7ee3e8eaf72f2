"""Load one of a run's GPTQ artifacts in GPTQModel (no code of ours) and check it against our
evaluation: every quantized linear built with the bits and group size the checkpoint's
`dynamic` mapping gives it, and the domain perplexity on the same test windows within 0.5%.

GPTQModel is not a dependency of this project (it needs torch >= 2.14.1): install it in a venv
of its own and pass that venv's python, e.g.

    python -m venv /tmp/gptqmodel-venv
    /tmp/gptqmodel-venv/bin/pip install torch==2.14.1 gptqmodel==7.7.0
    python scripts/check_gptqmodel.py runs/smollm2_compare gptq-mixed --python /tmp/gptqmodel-venv/bin/python

The windows are the ones `evaluate-<artifact>` scored (the data stage's domain_eval stream, cut
with that stage's settings) and are handed to the other interpreter in a file; it runs with the
repository off its path, in float32 on the CPU with GPTQModel's torch backend (loaded in bf16, which that backend
requires, then cast to float32). Writes
benchmarks/gptqmodel_<artifact>.json and prints a table; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from independent_scoring import evaluation, score_in_fresh_interpreter

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.005  # relative perplexity difference allowed (float32 both sides; kernels differ)

# GPTQModel's torch backend is selected only for fp16/bf16; once built, the model is cast to
# float32 (scales, norms, embeddings), as our evaluation computes on the CPU
IN_GPTQMODEL = """
import gptqmodel
from gptqmodel import BACKEND, GPTQModel
model = GPTQModel.load(checkpoint, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16).model.float()
result["linears"] = {name: {"bits": int(m.bits), "group_size": int(m.group_size), "class": type(m).__name__}
                     for name, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "bits")}
result.update(gptqmodel=gptqmodel.__version__, torch=torch.__version__)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("artifact", help="a quantize entry's name (its GPTQ checkpoint: quantize-<artifact>/output)")
    parser.add_argument("--python", required=True, help="a python with gptqmodel installed")
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/gptqmodel_<artifact>.json)")
    args = parser.parse_args()

    from qlora_pipeline.layerwise.families import family_for
    from qlora_pipeline.methods import dynamic

    checkpoint = args.run_dir / f"quantize-{args.artifact}" / "output"
    config = json.loads((checkpoint / "config.json").read_text())
    qcfg = config["quantization_config"]
    if qcfg.get("quant_method") != "gptq":
        sys.exit(f"{checkpoint}: not a GPTQ checkpoint")
    ours = evaluation(args.run_dir, args.artifact)
    theirs = score_in_fresh_interpreter(args.python, IN_GPTQMODEL, checkpoint, ours.windows, ours.batch_size)

    # what each linear should be, by our reading of the mapping
    wrong = {}
    for name, got in theirs["linears"].items():
        want = {"bits": qcfg["bits"], "group_size": qcfg["group_size"], **dynamic.override(qcfg.get("dynamic"), name)}
        if (got["bits"], got["group_size"]) != (want["bits"], want["group_size"]):
            wrong[name] = {"gptqmodel": got, "checkpoint": want}
    per_setting = dict(Counter(f"w{got['bits']}g{got['group_size']}" for got in theirs["linears"].values()))
    ours_ppl = ours.metrics["domain_ppl"]
    rel = theirs["domain_ppl"] / ours_ppl - 1
    checks = {
        "loaded_without_our_code": not theirs["our_modules"],
        "every_linear_quantized": set(theirs["linears"]) == {n for n, _ in family_for(config["model_type"])
                                                            .linear_names(config)},
        "dynamic_honoured": not wrong,
        "domain_ppl_within_0.5%": math.isfinite(rel) and abs(rel) <= TOLERANCE,
    }
    result = {"artifact": args.artifact, "checkpoint_format": qcfg.get("checkpoint_format"), "sym": qcfg.get("sym"),
              "dynamic": qcfg.get("dynamic"), "linears_by_setting": per_setting, "mismatched_linears": wrong,
              "domain_ppl_ours": ours_ppl, "domain_ppl_gptqmodel": theirs["domain_ppl"], "relative_difference": rel,
              "domain_tokens": theirs["domain_tokens"], "gptqmodel_dtype": "float32",
              "gptqmodel": theirs["gptqmodel"], "gptqmodel_torch": theirs["torch"], "checks": checks,
              "command": f"python scripts/check_gptqmodel.py {args.run_dir} {args.artifact} --python PY"}
    out = args.out or REPO / "benchmarks" / f"gptqmodel_{args.artifact}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.artifact}: {len(theirs['linears'])} linears in GPTQModel {theirs['gptqmodel']}: "
          + ", ".join(f"{n} x {k}" for k, n in sorted(per_setting.items())))
    print(f"{'':<26}{'ours':>10}{'GPTQModel':>12}{'diff':>9}")
    print(f"{'domain ppl (test split)':<26}{ours_ppl:>10.4f}{theirs['domain_ppl']:>12.4f}{rel * 100:>8.3f}%")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
