"""The summed next-token NLL behind every perplexity: the output head and the loss run over a
bounded number of positions at a time (the whole batch's float32 logits of a 128k vocabulary
would not fit beside an 8B model on a 24 GB card), and give what the whole forward's logits give."""
from __future__ import annotations

import math

import torch

from qlora_pipeline import scoring
from qlora_pipeline.layerwise.checkpoints import load_hf_model


def _whole_logits_nll(model, windows: torch.Tensor) -> float:
    """The reference: the model's own forward, every logit at once, float32 loss."""
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             windows[:, 1:].reshape(-1), reduction="sum").item()


def test_chunked_head_gives_the_whole_forwards_nll_and_bounds_the_logits(tiny_llama_dir, monkeypatch):
    model = load_hf_model(tiny_llama_dir, torch.float32, "cpu")
    windows = torch.randint(0, model.config.vocab_size, (5, 33))
    rows_seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    monkeypatch.setattr(scoring, "HEAD_CHUNK_POSITIONS", 20)  # does not divide 2 x 32 positions

    nll, tokens = scoring.summed_nll(model, windows, 2, "cpu")

    assert tokens == 5 * 32
    # 3 batches (2, 2, 1 windows): 64 positions in chunks of 20, 20, 20, 4; then 32 in 20, 12
    assert rows_seen == [20, 20, 20, 4, 20, 20, 20, 4, 20, 12]
    reference = _whole_logits_nll(model, windows)
    assert math.isclose(nll, reference, rel_tol=1e-6), (nll, reference)


def test_each_windows_nll_is_its_own_forwards_even_when_head_chunks_cross_windows(tiny_llama_dir, monkeypatch):
    """The per-window sums the report's paired intervals use: window i's entry is the NLL of
    window i alone, though the head's chunks of positions straddle window boundaries."""
    model = load_hf_model(tiny_llama_dir, torch.float32, "cpu")
    windows = torch.randint(0, model.config.vocab_size, (5, 33))
    monkeypatch.setattr(scoring, "HEAD_CHUNK_POSITIONS", 20)
    nlls = scoring.window_nlls(model, windows, 2, "cpu")
    assert nlls.dtype == torch.float64 and nlls.shape == (5,)
    for i in range(5):
        assert math.isclose(float(nlls[i]), _whole_logits_nll(model, windows[i : i + 1]), rel_tol=1e-6)
    assert math.isclose(scoring.perplexity_of(nlls, 33), math.exp(float(nlls.sum()) / (5 * 32)))


def test_a_model_that_post_processes_its_logits_is_scored_on_its_whole_forward(tiny_llama_dir, monkeypatch):
    """Soft-capped logits (Gemma 2's final_logit_softcapping) are not head(hidden): no chunking."""
    model = load_hf_model(tiny_llama_dir, torch.float32, "cpu")
    windows = torch.randint(0, model.config.vocab_size, (2, 17))
    assert scoring.body_and_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert scoring.body_and_head(model) is None
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs.get("use_cache")), with_kwargs=True)
    nll, _ = scoring.summed_nll(model, windows, 2, "cpu")
    assert calls == [False]  # the whole model ran, without building a KV cache it never reads
    assert math.isclose(nll, _whole_logits_nll(model, windows), rel_tol=1e-6)


def test_throughput_decodes_with_the_cache_under_its_current_name(tiny_llama_dir):
    """The decode loop passes the returned KV cache back under the name the model's forward takes
    (`cache` in transformers 5.x; `past_key_values` warns there and goes away in 5.40), and
    the cache is really used: each step sees one new token at the right position."""
    import warnings

    from qlora_pipeline.stages.evaluate import throughput

    model = load_hf_model(tiny_llama_dir, torch.float32, "cpu")
    lengths = []
    model.register_forward_hook(lambda m, args, kwargs, out: lengths.append(
        (kwargs["input_ids"].shape[1], scoring.returned_cache(out).get_seq_length())), with_kwargs=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated argument name warns
        result = throughput(model, prompt, decode_tokens=3, device="cpu", repeats=1)
    assert result["decode_tokens_per_second"] > 0 and result["prefill_tokens_per_second"] > 0
    # per repeat: the prefill (no cache read back), the 16-token prompt, 3 single-token steps
    steps = [(1, 17), (1, 18), (1, 19)]
    assert lengths[1:5] == [(16, 16), *steps] and lengths[6:10] == [(16, 16), *steps]
