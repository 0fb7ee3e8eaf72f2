"""Stage `calibrate`: the calibration windows, drawn once from the domain *train* split.

`calibration.safetensors` holds `input_ids` int64 [samples, seq_len]; every quantizer reads
these same tokens. Start offsets come from one seeded `torch.randint` call over the train
token stream (the protocol of docs/baselines.md#protocol).
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from qlora_pipeline.errors import DataError
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.recipe import CalibrationConfig
from qlora_pipeline.stages.data import TOKENS_FILE

CALIBRATION_FILE = "calibration.safetensors"

def run(ctx: StageContext) -> StageResult:
    cfg = CalibrationConfig.model_validate(ctx.config["calibration"])
    stream = load_file(str(ctx.inputs["data"] / TOKENS_FILE))["domain_train"]
    if stream.numel() < cfg.seq_len:
        raise DataError(f"calibration.seq_len: {cfg.seq_len} exceeds the {stream.numel()} domain train tokens")
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len + 1, (cfg.samples,), generator=generator)
    ids = torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
    save_file({"input_ids": ids.contiguous()}, str(ctx.output_dir / CALIBRATION_FILE))
    return StageResult(metrics={"samples": float(cfg.samples), "tokens": float(ids.numel())},
                       info={"first_offsets": starts[:4].tolist()})
