"""Check two of the report's deployment answers on a finished run, each by a route that shares
no code with the pipeline's own evaluation:

1. **NF4 in plain transformers.** The `nf4` artifact (the merged model requantized to NF4)
   loaded by transformers + bitsandbytes in a fresh interpreter outside the repository, scored
   on the same test windows: its perplexity must agree with `evaluate-<nf4>`'s within 0.5%.
2. **fp8 KV cache, independently.** The merged model in plain transformers with the keys
   rounded through fp8 e4m3 where the rotary embedding returns them (`apply_rotary_pos_emb`
   patched) and the values where `v_proj` returns them (a forward hook), no KV cache involved;
   once with scale 1.0 and once with per-layer amax / 448 scales measured by the same hooks on
   the domain_train calibration windows. Both perplexities must agree with
   `evaluate-merged`'s `kv_fp8_domain_ppl` and `kv_fp8_calibrated_domain_ppl` within 0.5%.

    python scripts/check_deploy_answers.py runs/smollm2_compare [--nf4 nf4]

Writes benchmarks/deploy_checks.json and prints a table; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from independent_scoring import evaluation, perplexity, score_in_fresh_interpreter

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.005

# transformers + bitsandbytes alone, as a user loads the NF4 checkpoint
PLAIN_NF4 = """
import bitsandbytes as bnb
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="cpu").eval()
result["linear4bit_modules"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
"""


def fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Round through float8_e4m3fn at `scale`, saturating at +-448 (a plain cast would give NaN)."""
    return ((x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class RoundedKV:
    """Hooks on a plain transformers Llama: keys rounded as the rotary embedding returns them,
    values as v_proj returns them; or (`scales` None) the largest |K| and |V| per layer recorded."""

    def __init__(self, model, scales=None):
        from transformers.models.llama import modeling_llama

        self.module, self.scales, self.layer = modeling_llama, scales, 0
        self.amax = [[0.0, 0.0] for _ in model.model.layers]
        self.original = modeling_llama.apply_rotary_pos_emb
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._enter(i)))
            self.handles.append(layer.self_attn.v_proj.register_forward_hook(self._values(i)))

    def _enter(self, i):
        def hook(module, args):
            self.layer = i
        return hook

    def _values(self, i):
        def hook(module, args, out):
            if self.scales is None:
                self.amax[i][1] = max(self.amax[i][1], float(out.abs().max()))
                return out
            return fp8(out, self.scales[i][1])
        return hook

    def _rotary(self, q, k, *args, **kwargs):
        q, k = self.original(q, k, *args, **kwargs)
        if self.scales is None:
            self.amax[self.layer][0] = max(self.amax[self.layer][0], float(k.abs().max()))
            return q, k
        return q, fp8(k, self.scales[self.layer][0])

    def __enter__(self):
        self.module.apply_rotary_pos_emb = self._rotary
        return self

    def __exit__(self, *exc):
        self.module.apply_rotary_pos_emb = self.original
        for h in self.handles:
            h.remove()


def row(name: str, ours: float, theirs: float) -> dict:
    rel = theirs / ours - 1
    return {"check": name, "ours": ours, "independent": theirs, "relative_difference": rel,
            "pass": math.isfinite(rel) and abs(rel) <= TOLERANCE}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--nf4", default="nf4", help="the name of the run's `method: nf4` entry")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "deploy_checks.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    rows, notes = [], {}
    nf4 = evaluation(args.run_dir, args.nf4)
    plain = score_in_fresh_interpreter(sys.executable, PLAIN_NF4, args.run_dir / f"quantize-{args.nf4}" / "output",
                                       nf4.windows, nf4.batch_size)
    rows.append(row(f"{args.nf4}: domain ppl, plain transformers + bitsandbytes", nf4.metrics["domain_ppl"],
                    plain["domain_ppl"]))
    notes["nf4_linear4bit_modules"] = plain["linear4bit_modules"]
    notes["nf4_loaded_without_our_code"] = not plain["our_modules"]

    merged = evaluation(args.run_dir, "merged")
    model = AutoModelForCausalLM.from_pretrained(args.run_dir / "merge" / "output", dtype=torch.float32).eval()
    with RoundedKV(model, [(1.0, 1.0)] * len(model.model.layers)):
        unit, _ = perplexity(model, merged.windows, merged.batch_size)
    with RoundedKV(model) as measure:
        perplexity(model, merged.calibration, merged.batch_size)
    # the hooks must have seen every layer's keys and values (else this check measures nothing)
    notes["hooks_saw_every_layer"] = all(k > 0 and v > 0 for k, v in measure.amax)
    scales = [(max(k, 1e-30) / 448.0, max(v, 1e-30) / 448.0) for k, v in measure.amax]
    with RoundedKV(model, scales):
        calibrated, _ = perplexity(model, merged.windows, merged.batch_size)
    rows.append(row("merged: fp8 KV ppl, scale 1.0 (hooks)", merged.metrics["kv_fp8_domain_ppl"], unit))
    rows.append(row("merged: fp8 KV ppl, calibrated scales (hooks)", merged.metrics["kv_fp8_calibrated_domain_ppl"],
                    calibrated))
    notes["merged_domain_ppl"] = merged.metrics["domain_ppl"]

    ok = (all(r["pass"] for r in rows) and notes["nf4_loaded_without_our_code"] and notes["nf4_linear4bit_modules"] > 0
          and notes["hooks_saw_every_layer"])
    args.out.write_text(json.dumps({"run": str(args.run_dir), "rows": rows, **notes, "pass": ok,
                                    "command": f"python scripts/check_deploy_answers.py {args.run_dir}"}, indent=2) + "\n")
    print(f"{'check':<58}{'ours':>10}{'independent':>13}{'diff':>9}")
    for r in rows:
        print(f"{r['check']:<58}{r['ours']:>10.4f}{r['independent']:>13.4f}{r['relative_difference'] * 100:>8.3f}%"
              f"  {'PASS' if r['pass'] else 'FAIL'}")
    print(f"nf4: {notes['nf4_linear4bit_modules']} bitsandbytes Linear4bit modules, "
          f"our code imported: {not notes['nf4_loaded_without_our_code']}")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
