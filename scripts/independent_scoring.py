"""Shared by the check_* scripts: the test windows one of a run's evaluations scored, and a
perplexity computed with plain torch (none of the pipeline's code), in this interpreter or in a
fresh one of another venv.

Only torch and safetensors are imported at module level, so that a fresh interpreter (GPTQModel's
venv, or ours with the repository off its path) can import this file and still hold no module of
ours; `our_modules()` says whether it does.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
# The installed names and the folders they come from (`kernels` is Hugging Face's kernel hub,
# which transformers imports: not ours).
OUR_PACKAGES = {"qlora_pipeline", "qlora_quant", "qlora_kernels", "pipeline", "quant"}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int) -> tuple[float, int]:
    """(exp of the mean next-token NLL over tokens 1..L-1 of every window, tokens predicted):
    the evaluation's definition, each window one forward, no KV cache."""
    nll, tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens), tokens


def our_modules() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in OUR_PACKAGES)


class Evaluation(NamedTuple):
    metrics: dict          # what evaluate-<artifact> measured
    batch_size: int
    windows: torch.Tensor  # the domain_eval (test split) windows it scored
    calibration: torch.Tensor  # the domain_train windows its fp8-KV scales came from


def evaluation(run_dir: Path, artifact: str) -> Evaluation:
    """What `evaluate-<artifact>` of `run_dir` measured, and on which windows (its manifest's settings)."""
    from qlora_pipeline import data
    from qlora_pipeline.recipe import EvaluateConfig

    manifest = json.loads((run_dir / f"evaluate-{artifact}" / "manifest.json").read_text())
    settings = dict(manifest["config"]["evaluate"])
    seq_len = settings.pop("seq_len")
    cfg = EvaluateConfig.model_validate(settings)
    streams = load_file(str(run_dir / "data" / "output" / "tokens.safetensors"))
    return Evaluation(manifest["metrics"], cfg.batch_size,
                      data.windows(streams["domain_eval"], seq_len, cfg.max_domain_windows),
                      data.windows(streams["domain_train"], seq_len, cfg.kv_fp8_calibration_windows))


# Around a loader: `checkpoint` is given; the loader sets `model` (what is called with input_ids)
# and may put more into `result`.
_PRELUDE = """import json, sys
sys.path.insert(0, {here!r})
import torch
from safetensors.torch import load_file
from independent_scoring import our_modules, perplexity
checkpoint, windows_file, batch, out = sys.argv[1:5]
result = {{}}
"""
_EPILOGUE = """
ppl, tokens = perplexity(model, load_file(windows_file)["windows"], int(batch))
result.update(domain_ppl=ppl, domain_tokens=tokens, our_modules=our_modules())
json.dump(result, open(out, "w"))
"""


def score_in_fresh_interpreter(python: str, loader: str, checkpoint: Path, windows: torch.Tensor, batch: int) -> dict:
    """Run `loader` (code setting `model` from `checkpoint`) in a fresh `python` started outside the
    repository, score `windows` there; its `result` with domain_ppl, domain_tokens, our_modules."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"windows": windows.contiguous()}, f"{tmp}/windows.safetensors")
        code = _PRELUDE.format(here=str(HERE)) + loader + _EPILOGUE
        subprocess.run([python, "-c", code, str(Path(checkpoint).resolve()), f"{tmp}/windows.safetensors", str(batch),
                        f"{tmp}/out.json"], cwd=tmp, check=True)
        return json.loads(Path(f"{tmp}/out.json").read_text())
