"""Stages `calibrate` and `calibrate-general`: the calibration windows, drawn once from the
domain *train* split (`calibration.source: domain`) or the general *train* split (`general`,
which the data stage prepares from general documents after those of `general_eval`, with every
general_eval and domain test paragraph cut out); never from a split that is evaluated.

`calibration.safetensors` holds `input_ids` int64 [samples, seq_len]; every quantizer reads
these same tokens. Start offsets come from one seeded `torch.randint` call over the train
token stream (the protocol of docs/baselines.md#protocol).
"""
from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file, save_file

from qlora_pipeline.errors import DataError
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.recipe import CalibrationConfig
from qlora_pipeline.stages.data import TOKENS_FILE

CALIBRATION_FILE = "calibration.safetensors"

logger = logging.getLogger(__name__)

def run(ctx: StageContext) -> StageResult:
    cfg = CalibrationConfig.model_validate(ctx.config["calibration"])
    split = f"{cfg.source}_train"
    streams = load_file(str(ctx.inputs["data"] / TOKENS_FILE))
    if split not in streams:  # the data stage prepares general_train whenever an entry calibrates on it
        raise DataError(f"calibration.source: the data stage's output has no {split} split")
    stream = streams[split]
    if stream.numel() < cfg.seq_len:
        raise DataError(f"calibration.seq_len: {cfg.seq_len} exceeds the {stream.numel()} {cfg.source} train tokens")
    if cfg.samples * cfg.seq_len > stream.numel():
        # Windows start anywhere, so some overlap is normal; past the split's size every further
        # window repeats text the set already holds: each quantizer's passes grow, its statistics
        # do not (100,000 windows of a small corpus once held 6.7 GiB and took GPTQ 317 s).
        logger.warning("calibration: %d windows of %d tokens draw %d tokens from the %d of %s, so they repeat "
                       "its text; at most calibration.samples %d cover it once", cfg.samples, cfg.seq_len,
                       cfg.samples * cfg.seq_len, stream.numel(), split, stream.numel() // cfg.seq_len)
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len + 1, (cfg.samples,), generator=generator)
    ids = torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
    save_file({"input_ids": ids.contiguous()}, str(ctx.output_dir / CALIBRATION_FILE))
    return StageResult(metrics={"samples": float(cfg.samples), "tokens": float(ids.numel())},
                       info={"first_offsets": starts[:4].tolist(), "source": split})
