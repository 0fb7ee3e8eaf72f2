"""Stage `data`: read the sources, split the domain by document, tokenize once.

Output `tokens.safetensors` holds int64 token streams `domain_train`, `domain_eval` and
(optionally) `general_eval`; every later stage cuts its windows from these, so all
artifacts are evaluated on the same tokens.
"""
from __future__ import annotations

import json

from safetensors.torch import save_file

from pipeline import data
from pipeline.errors import DataError
from pipeline.graph import StageContext, StageResult
from pipeline.models import resolve_model

VERSION = 1


def run(ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    cfg = ctx.recipe.data
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ctx.recipe.model))
    docs = data.load_documents(cfg.domain, "data.domain")
    train_docs, eval_docs = data.split_documents(docs, cfg.holdout_every)
    if not train_docs:
        raise DataError(f"data.domain: only {len(docs)} document(s); with holdout_every={cfg.holdout_every} none is left for training")
    streams = {
        "domain_train": data.tokenize_documents(tokenizer, train_docs),
        "domain_eval": data.tokenize_documents(tokenizer, eval_docs),
    }
    if cfg.general is not None:
        general_docs = data.load_documents(cfg.general, "data.general", max_chars=cfg.general_max_tokens * 6)
        streams["general_eval"] = data.tokenize_documents(tokenizer, general_docs, max_tokens=cfg.general_max_tokens)
    for name, key in (("domain_eval", "data.domain"), ("domain_train", "data.domain"), ("general_eval", "data.general")):
        if name in streams and streams[name].numel() < cfg.seq_len:
            raise DataError(
                f"{key}: {name} has {streams[name].numel()} tokens, fewer than one window of data.seq_len={cfg.seq_len}; "
                "add text or lower data.seq_len"
            )
    save_file({k: v.contiguous() for k, v in streams.items()}, str(ctx.output_dir / "tokens.safetensors"))
    stats = {
        "domain_documents": len(docs), "train_documents": len(train_docs), "eval_documents": len(eval_docs),
        **{f"{k}_tokens": int(v.numel()) for k, v in streams.items()},
    }
    (ctx.output_dir / "data.json").write_text(json.dumps(stats, indent=2))
    return StageResult(metrics={k: float(v) for k, v in stats.items()})
