"""Stage `data`: read the sources, split the domain by document, decontaminate, tokenize once.

The domain is split by document into `train`, `valid` and `eval` (the test split), then every
held-out paragraph is cut out of the training side (`pipeline.data.decontaminate`): nothing of
eval or of the general text evaluated for forgetting is in valid or train, nothing of valid in
train. Output `tokens.safetensors` holds int64
token streams `domain_train` (trained on, and calibration), `domain_valid` (training's eval
loss, `merge.into: auto`, the merge's self-check), `domain_eval` (the evaluate stages only)
and (optionally) `general_eval`; every later stage cuts its windows from these, so all
artifacts are evaluated on the same tokens. When a quantize entry calibrates on general text
(the stage's settings then hold `general_train_tokens`), also `general_train`: the general
documents after those general_eval reads from (one document of margin), with every paragraph
of general_eval and of the domain test and validation splits cut out (`data.general_train_split`);
general_eval is the same tokens either way. `data.json` holds the counts and the overlap of
each split pair before and after cleaning.
"""
from __future__ import annotations

import json
from dataclasses import replace

from safetensors.torch import save_file

from qlora_pipeline import data
from qlora_pipeline.data_identity import load_revision
from qlora_pipeline.errors import DataError
from qlora_pipeline.graph import StageContext, StageResult
from qlora_pipeline.models import resolve_model, stage_model
from qlora_pipeline.recipe import DataConfig

# int64 token streams: domain_train, domain_valid, domain_eval, general_eval (, general_train)
TOKENS_FILE = "tokens.safetensors"
SUMMARY_FILE = "data.json"


def run(ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    cfg = DataConfig.model_validate(ctx.config["data"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(stage_model(ctx.config, ctx.runtime)))
    docs = data.load_documents(cfg.domain, "data.domain", revision=_revision(ctx, cfg, "domain"))
    by_document = data.split_documents(docs, cfg.holdout_every, cfg.valid_every)
    _require_documents(by_document, len(docs), cfg)
    general_docs = None
    if cfg.general is not None:
        general_docs = data.load_documents(cfg.general, "data.general", max_chars=cfg.general_max_tokens * 6,
                                           revision=_revision(ctx, cfg, "general"))
        # The documents general_eval's tokens come from (its first general_max_tokens tokens),
        # held out from train and valid like the test split, so the forgetting figure is on
        # text no stage has seen; the general documents after them are not evaluated.
        evaluated = data.eval_document_count(tokenizer, general_docs, cfg.general_max_tokens)
        by_document = replace(by_document, general_eval=general_docs[:evaluated])
    splits, report = data.decontaminate(by_document, cfg.decontaminate)
    _require_clean(splits, report, cfg)
    streams = {f"domain_{name}": data.tokenize_documents(tokenizer, getattr(splits, name))
               for name in ("train", "valid", "eval")}
    general_train = None
    if general_docs is not None:
        streams["general_eval"] = data.tokenize_documents(tokenizer, general_docs, max_tokens=cfg.general_max_tokens)
        train_tokens = ctx.config.get("general_train_tokens")
        if train_tokens:
            general_train = _general_train(tokenizer, cfg, train_tokens, splits.eval, splits.valid,
                                           _revision(ctx, cfg, "general"))
            streams["general_train"] = data.tokenize_documents(tokenizer, general_train.docs, max_tokens=train_tokens)
    for name, key in (("domain_eval", "data.domain"), ("domain_valid", "data.domain"), ("domain_train", "data.domain"),
                      ("general_eval", "data.general"), ("general_train", "data.general_train_tokens")):
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
    metrics = {**{k: float(v) for k, v in stats.items()}, **report.metrics()}
    if general_train is not None:
        summary["general_train"] = {
            "eval_documents": general_train.eval_documents, "train_documents": len(general_train.docs),
            "skipped_documents": general_train.skipped_documents, "removed_chars": general_train.removed_chars,
            "overlap_after": {k: v.as_dict() for k, v in general_train.overlap_after.items()},
            "shared_chars_after": dict(general_train.shared_after)}
        metrics["general_train_documents"] = float(len(general_train.docs))
    (ctx.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return StageResult(metrics=metrics)


def _revision(ctx: StageContext, cfg: DataConfig, key: str):
    """The revision a hub source `key` ("domain", "general") is loaded at: the commit in the
    stage's settings (`data_identity`), so the tokens are of the text the fingerprint names."""
    source = getattr(cfg, key)
    if source is None or source.hub is None:
        return None
    return load_revision(source, ctx.config.get("content", {}).get(key, {}))


def _general_train(tokenizer, cfg, train_tokens: int, domain_eval: list[str], domain_valid: list[str],
                   revision=None) -> data.GeneralTrain:
    """The general train split (calibration only), distinct from general_eval and free of the
    domain test and validation splits' paragraphs."""
    # More documents for it: the built-in python-stdlib corpus is read up to a character budget,
    # in one seeded order, so general_eval's documents stay the leading ones (a file can be tens
    # of thousands of characters: 2M more leave room after them); other sources read all their
    # documents either way. Only about train_tokens x 6 characters of them are tokenized.
    docs = data.load_documents(cfg.general, "data.general",
                               max_chars=(cfg.general_max_tokens + train_tokens) * 6 + 2_000_000,
                               revision=revision)
    split = data.general_train_split(tokenizer, docs, cfg.general_max_tokens, train_tokens * 6, domain_eval,
                                     cfg.decontaminate.min_chars, selected_on=domain_valid,
                                     quote_markers=cfg.decontaminate.quote_markers)
    if not split.docs:
        raise DataError(f"data.general: all {len(docs)} general document(s) go to general_eval (general_max_tokens="
                        f"{cfg.general_max_tokens}) or hold only its text; none is left for the general train split "
                        "that calibration.source / calibration_source: general draws from; add text or lower "
                        "data.general_max_tokens")
    if any(o.paragraphs for o in split.overlap_after.values()) or any(split.shared_after.values()):
        left = ", ".join([f"{k}: {o.paragraphs} paragraph(s)" for k, o in split.overlap_after.items() if o.paragraphs]
                         + [f"{k}: {n} shared character(s)" for k, n in split.shared_after.items() if n])
        raise DataError(f"data.general: held-out text is still in the general train split after cleaning ({left})")
    return split


def _require_documents(splits: data.Splits, total: int, cfg) -> None:
    """Every split holds a document after the split by document (eval always does: it gets
    document 0)."""
    if not splits.valid:
        raise DataError(f"data.holdout_every: only {total} document(s); with holdout_every={cfg.holdout_every} "
                        "none is left for validation and training (documents identical to a test document are dropped); "
                        f"give more documents (a folder of files, JSON Lines records) or {_cut_hint(cfg)}")
    if not splits.train:
        raise DataError(f"data.valid_every: of {total} document(s), none is left for training (holdout_every="
                        f"{cfg.holdout_every}, valid_every={cfg.valid_every}); add documents, {_cut_hint(cfg)}, "
                        "or raise these")


def _cut_hint(cfg) -> str:
    """How to get more documents out of long ones: document_chars, or, where it is set already,
    why it did not (it cuts only at a line break)."""
    chars = cfg.domain.document_chars
    if chars is None:
        return "cut long ones into several with data.domain.document_chars (e.g. 4000)"
    return (f"lower data.domain.document_chars ({chars}; it cuts a document only at a paragraph or line break "
            f"after that many characters, so text without line breaks stays one document)")


def _require_clean(splits: data.Splits, report: data.Decontamination, cfg) -> None:
    """After decontamination: no held-out paragraph left in a training side, and no split
    emptied by the cleaning."""
    if not report.clean:
        left = ", ".join([f"{k}: {o.paragraphs} paragraph(s)" for k, o in report.after.items() if o.paragraphs]
                         + [f"{k}: {n} character(s) in stretches the held-out text also holds"
                            for k, n in report.shared_after.items() if n])
        raise DataError(f"data.domain: held-out text is still in the training side after decontamination ({left})")
    for name in ("valid", "train"):
        if not getattr(splits, name):
            raise DataError(f"data.decontaminate: every domain {name} document is held-out text (paragraphs of "
                            f">= {cfg.decontaminate.min_chars} chars of the test split, the validation split or "
                            f"data.general's evaluated text); nothing is left for {name}; add documents, change "
                            "data.holdout_every / data.valid_every, or point data.general at text other than the domain's")
