"""The training loss with the frozen head chunked: the same loss and the same LoRA gradients as
transformers' own loss, without keeping the batch's vocabulary-wide logits for the backward."""
from __future__ import annotations

import pytest
import torch

from qlora_pipeline.layerwise.checkpoints import load_hf_model
from qlora_pipeline.lora import attach_lora
from qlora_pipeline.next_token_loss import frozen_head, next_token_loss


def _lora_model(model_dir, dtype=torch.float32):
    torch.manual_seed(0)
    model = attach_lora(load_hf_model(model_dir, dtype, "cpu"), ["q_proj", "v_proj", "down_proj"], 4, 8.0, 0.0)
    with torch.no_grad():  # peft starts B at zero: no gradient would reach A, nor the hidden states' path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [7, 1024], ids=["uneven-chunks", "one-chunk"])
def test_same_loss_and_lora_gradients_as_transformers_loss(tiny_llama_dir, chunk):
    model = _lora_model(tiny_llama_dir)
    batch = torch.randint(0, model.config.vocab_size, (3, 17))
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(input_ids=batch, labels=batch).loss)
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, model, batch, chunk=chunk))

    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 3 * 2  # A and B of 3 targets in 3 layers
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert frozen_head(model) is model.get_base_model().lm_head  # the head is back in place after the forward


def test_the_backward_keeps_no_vocabulary_wide_tensor(tiny_llama_dir):
    """What autograd saves for the backward: transformers' loss keeps [positions x vocabulary]
    float32 tensors; the chunked loss keeps none wider than the hidden size."""
    model = _lora_model(tiny_llama_dir)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    batch = torch.randint(0, vocab, (2, 33))

    def widest_saved(loss_fn):
        widths = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: widths.append(t.shape[-1] if t.dim() else 0) or t,
                                                      lambda t: t):
            loss_fn()
        return max(widths)

    assert widest_saved(lambda: model(input_ids=batch, labels=batch).loss) == vocab
    assert widest_saved(lambda: next_token_loss(model, model, batch, chunk=16)) < vocab
    assert max(model.config.intermediate_size, hidden) < vocab


def test_a_trained_or_post_processed_head_takes_transformers_loss(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir)
    batch = torch.randint(0, model.config.vocab_size, (2, 9))
    assert frozen_head(model) is not None
    model.get_base_model().lm_head.weight.requires_grad_(True)  # a head trained with the adapters
    assert frozen_head(model) is None
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, model, batch))
    assert grads["base_model.model.lm_head.weight"].abs().sum() > 0  # its gradient is made, by transformers' loss
    ref_loss, _ = _loss_and_grads(model, lambda: model(input_ids=batch, labels=batch).loss)
    assert loss == ref_loss

    model.get_base_model().lm_head.weight.requires_grad_(False)
    model.config.final_logit_softcapping = 30.0
    assert frozen_head(model) is None


def test_bf16_compute_matches_transformers_loss_to_bf16_rounding(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir, torch.bfloat16)
    batch = torch.randint(0, model.config.vocab_size, (2, 17))
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(input_ids=batch, labels=batch).loss)
    loss, grads = _loss_and_grads(model, lambda: next_token_loss(model, model, batch, chunk=5))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in grads:  # bf16 logits and head matmuls (8 significant bits), rounded at different points
        error = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < 0.02, (name, error.item())
