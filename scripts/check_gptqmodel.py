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
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.005  # relative perplexity difference allowed (float32 both sides; kernels differ)

# Runs in the other interpreter; argv: checkpoint, windows file, batch size, output JSON.
IN_GPTQMODEL = r"""
import json, math, sys
import torch
from safetensors.torch import load_file
from gptqmodel import BACKEND, GPTQModel

# GPTQModel's torch backend is selected only for fp16/bf16; once built, the model is cast to
# float32 (scales, norms, embeddings), as our evaluation computes on the CPU
model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
model.model.float()
linears = {name: {"bits": int(m.bits), "group_size": int(m.group_size), "class": type(m).__name__}
           for name, m in model.model.named_modules() if hasattr(m, "qweight") and hasattr(m, "bits")}
windows, batch = load_file(sys.argv[2])["windows"], int(sys.argv[3])
nll, tokens = 0.0, 0
with torch.no_grad():
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        logits = model.model(input_ids=ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        tokens += ids[:, 1:].numel()
ours = sorted(m for m in sys.modules if m.startswith(("qlora", "pipeline", "kernels", "quant")))
json.dump({"linears": linears, "domain_ppl": math.exp(nll / tokens), "domain_tokens": tokens, "our_modules": ours,
           "gptqmodel": __import__("gptqmodel").__version__, "torch": torch.__version__}, open(sys.argv[4], "w"))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("artifact", help="a quantize entry's name (its GPTQ checkpoint: quantize-<artifact>/output)")
    parser.add_argument("--python", required=True, help="a python with gptqmodel installed")
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/gptqmodel_<artifact>.json)")
    args = parser.parse_args()

    from qlora_pipeline import data
    from qlora_pipeline.methods import dynamic
    from qlora_pipeline.recipe import EvaluateConfig

    checkpoint = args.run_dir / f"quantize-{args.artifact}" / "output"
    evaluation = json.loads((args.run_dir / f"evaluate-{args.artifact}" / "manifest.json").read_text())
    qcfg = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    if qcfg.get("quant_method") != "gptq":
        sys.exit(f"{checkpoint}: not a GPTQ checkpoint")
    settings = dict(evaluation["config"]["evaluate"])
    seq_len = settings.pop("seq_len")
    cfg = EvaluateConfig.model_validate(settings)
    streams = load_file(str(args.run_dir / "data" / "output" / "tokens.safetensors"))
    windows = data.windows(streams["domain_eval"], seq_len, cfg.max_domain_windows)

    with tempfile.TemporaryDirectory() as tmp:
        save_file({"windows": windows.contiguous()}, f"{tmp}/windows.safetensors")
        subprocess.run([args.python, "-c", IN_GPTQMODEL, str(checkpoint.resolve()), f"{tmp}/windows.safetensors",
                        str(cfg.batch_size), f"{tmp}/out.json"], cwd=tmp, check=True)
        theirs = json.loads(Path(f"{tmp}/out.json").read_text())

    # what each linear should be, by our reading of the mapping
    wrong = {}
    for name, got in theirs["linears"].items():
        want = {"bits": qcfg["bits"], "group_size": qcfg["group_size"], **dynamic.override(qcfg.get("dynamic"), name)}
        if (got["bits"], got["group_size"]) != (want["bits"], want["group_size"]):
            wrong[name] = {"gptqmodel": got, "checkpoint": want}
    per_setting: dict[str, int] = {}
    for got in theirs["linears"].values():
        key = f"w{got['bits']}g{got['group_size']}"
        per_setting[key] = per_setting.get(key, 0) + 1
    ours_ppl = evaluation["metrics"]["domain_ppl"]
    rel = theirs["domain_ppl"] / ours_ppl - 1
    checks = {
        "loaded_without_our_code": not theirs["our_modules"],
        "every_linear_quantized": len(theirs["linears"]) == int(json.loads((checkpoint / "config.json").read_text())
                                                                ["num_hidden_layers"]) * 7,
        "dynamic_honoured": not wrong,
        "domain_ppl_within_0.5%": math.isfinite(rel) and abs(rel) <= TOLERANCE,
    }
    result = {"artifact": args.artifact, "checkpoint_format": qcfg.get("checkpoint_format"), "sym": qcfg.get("sym"),
              "dynamic": qcfg.get("dynamic"), "linears_by_setting": per_setting, "mismatched_linears": wrong,
              "domain_ppl_ours": ours_ppl, "domain_ppl_gptqmodel": theirs["domain_ppl"], "relative_difference": rel,
              "domain_tokens": theirs["domain_tokens"], "our_eval_dtype": cfg.dtype, "gptqmodel_dtype": "float32",
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
