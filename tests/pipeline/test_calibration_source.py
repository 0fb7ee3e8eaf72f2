"""Calibration source (issue 14, item 3): `calibration.source: domain | general` as the default
and per quantize entry (`calibration_source`); the general *train* split the data stage
prepares for it, distinct from general_eval; stage names and fingerprints per source."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.conftest import cli, random_adapter, tiny_recipe

ENTRIES = [
    {"name": "gptq", "method": "gptq", "group_size": 32},
    {"name": "gptq-general", "method": "gptq", "group_size": 32, "calibration_source": "general"},
    {"name": "awq-gptq", "method": "awq+gptq", "group_size": 32},
    {"name": "awq-gptq-general", "method": "awq+gptq", "group_size": 32, "calibration_source": "general"},
    {"name": "rtn", "method": "rtn", "group_size": 32},
]


def recipe(model_dir, tmp_path, adapter, entries=ENTRIES, **sections):
    defaults = {"run": {"name": "c"}, "tracking": {"enabled": False}, "merge": {"adapter": str(adapter)},
                "calibration": {"samples": 4, "seq_len": 128}, "evaluate": {"speed": False, "prompts": []}}
    for key, value in sections.items():
        defaults[key] = {**defaults.get(key, {}), **value}
    r = tiny_recipe(model_dir, tmp_path, **defaults)
    r["quantize"] = entries
    return r


def test_stages_and_fingerprints_per_calibration_source(tiny_llama_dir, tmp_path, write_recipe):
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    specs = {s.name: s for s in build_stages(load_recipe(write_recipe(recipe(tiny_llama_dir, tmp_path, adapter)))[0])}
    assert specs["calibrate"].config["calibration"]["source"] == "domain"
    assert specs["calibrate-general"].config["calibration"]["source"] == "general"
    assert [n for n in specs if "search" in n] == ["awq-search-w4g32", "awq-search-w4g32-general"]
    assert specs["awq-search-w4g32-general"].deps == ("merge", "calibrate-general")
    assert specs["quantize-gptq"].deps == ("merge", "calibrate")
    assert specs["quantize-gptq-general"].deps == ("merge", "calibrate-general")
    assert specs["quantize-awq-gptq-general"].deps == ("merge", "calibrate-general", "awq-search-w4g32-general")
    # The source is in the quantize stage's settings (its fingerprint), resolved; rtn takes none.
    assert specs["quantize-gptq"].config["entry"]["calibration_source"] == "domain"
    assert specs["quantize-gptq-general"].config["entry"]["calibration_source"] == "general"
    assert "calibration_source" not in specs["quantize-rtn"].config["entry"]
    assert specs["data"].config["general_train_tokens"] == 200_000

    # calibration.source is the default of the entries that do not say; domain-only recipes
    # prepare no general train split (their data stage's settings are as before).
    by_default = recipe(tiny_llama_dir, tmp_path, adapter, ENTRIES[:1], calibration={"source": "general"})
    specs = {s.name: s for s in build_stages(load_recipe(write_recipe(by_default, "g.yaml"))[0])}
    assert "calibrate" not in specs and specs["quantize-gptq"].deps == ("merge", "calibrate-general")
    domain_only = recipe(tiny_llama_dir, tmp_path, adapter, ENTRIES[:1])
    specs = {s.name: s for s in build_stages(load_recipe(write_recipe(domain_only, "d.yaml"))[0])}
    assert "calibrate-general" not in specs and "general_train_tokens" not in specs["data"].config
    assert "general_train_tokens" not in specs["data"].config["data"]


def test_calibration_source_recipe_errors(tiny_llama_dir, tmp_path, write_recipe, capsys):
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    cases = (
        (recipe(tiny_llama_dir, tmp_path, adapter, [{"name": "r", "method": "rtn", "calibration_source": "general"}]),
         "method rtn takes no calibration windows; remove calibration_source"),
        (recipe(tiny_llama_dir, tmp_path, adapter, ENTRIES[1:2], data={"general": None}),
         "quantize.0.calibration_source: general calibrates quantize entry 'gptq-general'"),
        (recipe(tiny_llama_dir, tmp_path, adapter, ENTRIES[:1], data={"general": None}, calibration={"source": "general"}),
         "calibration.source: general calibrates"),
        (recipe(tiny_llama_dir, tmp_path, adapter, [{**ENTRIES[0], "calibration_source": "web"}]),
         "quantize.0.calibration_source"),
    )
    for r, message in cases:
        assert cli("validate", str(write_recipe(r))) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_general_train_split_leaves_out_general_eval_and_the_domain_test_split(smollm2_dir):
    from transformers import AutoTokenizer

    from qlora_pipeline import data

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    shared = "A paragraph of general text that the evaluation documents and a later document both hold, verbatim."
    secret = "A paragraph of the domain's test split that a general document quotes, word for word, at length."
    docs = [f"eval document {i}: " + " ".join(f"word{i}x{j}" for j in range(40)) + "\n\n" + shared for i in range(3)]
    chosen_on = "A paragraph of the domain's validation split, which a general document quotes word for word too."
    docs += ["margin document", docs[0], f"later text\n\n{shared}\n\nkept text here", f"{secret}\n\nmore kept text",
             f"last document\n\n{chosen_on}"]
    n = data.tokenize_documents(tokenizer, docs[:2]).numel() + 5  # general_eval reaches into the third document
    eval_tokens = data.tokenize_documents(tokenizer, docs, max_tokens=n)
    k = data.eval_document_count(tokenizer, docs, n)
    assert torch.equal(data.tokenize_documents(tokenizer, docs[:k], n), eval_tokens)
    assert data.tokenize_documents(tokenizer, docs[:k - 1], n).numel() < n

    split = data.general_train_split(tokenizer, docs, n, 10_000, [f"title\n\n{secret}"], min_chars=40,
                                     selected_on=[chosen_on])
    assert split.eval_documents == k == 3
    assert split.skipped_documents == 2  # the margin document and the repeated eval document
    assert split.docs == ["later text\n\nkept text here", "more kept text", "last document"]
    assert split.removed_chars >= len(shared) + len(secret) + len(chosen_on)
    assert set(split.overlap_after) == {"general_eval_in_general_train", "domain_eval_in_general_train",
                                        "domain_valid_in_general_train"}
    assert not any(o.paragraphs for o in split.overlap_after.values())


def test_general_calibration_through_the_runner(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    """The same merged model quantized on domain and on general calibration windows, in one run:
    the general windows come from general_train, which shares no window with general_eval, and
    general_eval is the same tokens as without it."""
    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(recipe(tiny_llama_dir, tmp_path, adapter, ENTRIES[:2], data={"general_train_tokens": 3000}))
    assert cli("run", str(path)) == 0
    run = tmp_path / "runs" / "c"
    streams = load_file(str(run / "data" / "output" / "tokens.safetensors"))
    train, held = streams["general_train"], streams["general_eval"]
    assert train.numel() == 3000
    summary = json.loads((run / "data" / "output" / "data.json").read_text())["general_train"]
    assert summary["eval_documents"] >= 1 and summary["train_documents"] >= 1
    assert not any(o["paragraphs"] for o in summary["overlap_after"].values())
    held_windows = {tuple(w.tolist()) for w in held.unfold(0, 32, 32)}
    assert not any(tuple(w.tolist()) in held_windows for w in train.unfold(0, 32, 1))

    def calibration(stage):
        return load_file(str(run / stage / "output" / "calibration.safetensors"))["input_ids"]

    text = "".join(map(chr, train.tolist()))  # each window is a run of general_train's tokens
    assert all("".join(map(chr, w.tolist())) in text for w in calibration("calibrate-general"))
    assert not torch.equal(calibration("calibrate"), calibration("calibrate-general"))
    a, b = ((run / f"quantize-{n}" / "output") for n in ("gptq", "gptq-general"))
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert any((a / p.name).read_bytes() != p.read_bytes() for p in b.glob("*.safetensors"))
    report = json.loads((run / "report" / "output" / "metrics.json").read_text())["artifacts"]
    assert {"gptq", "gptq-general"} <= set(report)

    # Without a general calibration the data stage writes the same general_eval and no general_train.
    other = recipe(tiny_llama_dir, tmp_path, adapter, ENTRIES[:1], run={"name": "o"})
    assert cli("run", str(write_recipe(other, "o.yaml")), "--only", "data") == 0
    plain = load_file(str(tmp_path / "runs" / "o" / "data" / "output" / "tokens.safetensors"))
    assert "general_train" not in plain and torch.equal(plain["general_eval"], held)


def test_a_calibration_set_larger_than_its_split_is_drawn_with_a_warning(tmp_path, caplog):
    """More window tokens than the train split holds repeat its text: the stage still draws
    them (seeded, the protocol's offsets) and says how many windows would cover it once."""
    from safetensors.torch import save_file

    from qlora_pipeline.graph import StageContext
    from qlora_pipeline.stages import calibrate

    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    save_file({"domain_train": torch.arange(1000)}, str(tmp_path / "data" / "tokens.safetensors"))

    def draw(samples):
        ctx = StageContext(name="calibrate", config={"calibration": {"samples": samples, "seq_len": 100, "seed": 0}},
                           inputs={"data": tmp_path / "data"}, output_dir=tmp_path / "out", checkpoint_dir=tmp_path,
                           metrics=None, progress=None, run_dir=tmp_path)
        caplog.clear()
        calibrate.run(ctx)
        return load_file(str(tmp_path / "out" / "calibration.safetensors"))["input_ids"]

    assert draw(10).shape == (10, 100) and not caplog.records  # 1,000 tokens: once over at most
    ids = draw(11)
    assert ids.shape == (11, 100) and torch.equal(ids[:, 1:] - ids[:, :-1], torch.ones(11, 99, dtype=ids.dtype))
    assert [r.getMessage() for r in caplog.records] == [
        "calibration: 11 windows of 100 tokens draw 1100 tokens from the 1000 of domain_train, so they repeat its "
        "text; at most calibration.samples 10 cover it once"]
