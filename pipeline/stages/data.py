"""Stage `data`: read the sources, split the domain by document, decontaminate, tokenize once.

The domain is split by document into `train`, `valid` and `eval` (the test split), then every
held-out paragraph is cut out of the training side (`pipeline.data.decontaminate`): nothing of
eval is in valid or train, nothing of valid in train. Output `tokens.safetensors` holds int64
token streams `domain_train` (trained on, and calibration), `domain_valid` (training's eval
loss, `merge.into: auto`, the merge's self-check), `domain_eval` (the evaluate stages only)
and (optionally) `general_eval`; every later stage cuts its windows from these, so all
artifacts are evaluated on the same tokens. `data.json` holds the counts and the overlap of
each split pair before and after cleaning.
"""
from __future__ import annotations

import json

from safetensors.torch import save_file

from qlora_pipeline import data
from qlora_pipeline.errors import DataError
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.models import resolve_model
from qlora_pipeline.recipe import DataConfig, ModelConfig

TOKENS_FILE = "tokens.safetensors"  # int64 token streams: domain_train, domain_valid, domain_eval, general_eval
SUMMARY_FILE = "data.json"


def run(ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    cfg = DataConfig.model_validate(ctx.config["data"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ModelConfig.model_validate(ctx.config["model"])))
    docs = data.load_documents(cfg.domain, "data.domain")
    by_document = data.split_documents(docs, cfg.holdout_every, cfg.valid_every)
    _require_documents(by_document, len(docs), cfg)
    splits, report = data.decontaminate(by_document, cfg.decontaminate)
    _require_clean(splits, report, cfg)
    streams = {f"domain_{name}": data.tokenize_documents(tokenizer, getattr(splits, name))
               for name in ("train", "valid", "eval")}
    if cfg.general is not None:
        general_docs = data.load_documents(cfg.general, "data.general", max_chars=cfg.general_max_tokens * 6)
        streams["general_eval"] = data.tokenize_documents(tokenizer, general_docs, max_tokens=cfg.general_max_tokens)
    for name, key in (("domain_eval", "data.domain"), ("domain_valid", "data.domain"), ("domain_train", "data.domain"),
                      ("general_eval", "data.general")):
        if name in streams and streams[name].numel() < cfg.seq_len:
            raise DataError(
                f"{key}: {name} has {streams[name].numel()} tokens, fewer than one window of data.seq_len={cfg.seq_len}; "
                "add text or lower data.seq_len"
            )
    save_file({k: v.contiguous() for k, v in streams.items()}, str(ctx.output_dir / TOKENS_FILE))
    stats = {
        "domain_documents": len(docs), "train_documents": len(splits.train), "valid_documents": len(splits.valid),
        "eval_documents": len(splits.eval), **{f"{k}_tokens": int(v.numel()) for k, v in streams.items()},
    }
    summary = {**stats, "decontamination": {"min_chars": cfg.decontaminate.min_chars, **report.as_dict()}}
    (ctx.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return StageResult(metrics={**{k: float(v) for k, v in stats.items()}, **report.metrics()})


def _require_documents(splits: data.Splits, total: int, cfg) -> None:
    """Every split holds a document after the split by document (eval always does: it gets
    document 0)."""
    if not splits.valid:
        raise DataError(f"data.holdout_every: only {total} document(s); with holdout_every={cfg.holdout_every} "
                        "none is left for validation and training (documents identical to a test document are dropped)")
    if not splits.train:
        raise DataError(f"data.valid_every: of {total} document(s), none is left for training (holdout_every="
                        f"{cfg.holdout_every}, valid_every={cfg.valid_every}); add documents or raise these")


def _require_clean(splits: data.Splits, report: data.Decontamination, cfg) -> None:
    """After decontamination: no held-out paragraph left in a training side, and no split
    emptied by the cleaning."""
    if not report.clean:
        left = ", ".join(f"{k}: {o.paragraphs} paragraph(s)" for k, o in report.after.items() if o.paragraphs)
        raise DataError(f"data.domain: held-out text is still in the training side after decontamination ({left})")
    for name in ("valid", "train"):
        if not getattr(splits, name):
            raise DataError(f"data.decontaminate: every domain {name} document is held-out text (paragraphs of "
                            f">= {cfg.decontaminate.min_chars} chars); nothing is left for {name}; add documents "
                            "or change data.holdout_every / data.valid_every")
