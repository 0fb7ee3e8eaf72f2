"""The training loss without the batch's vocabulary-wide logits.

transformers' causal-LM loss runs the head over every position of the micro batch and keeps,
for the backward, the logits' float32 copy and float32 log-softmax, then makes their float32
gradient: about 14 bytes per logit, 3.4 GiB for one 2,048-token window of Llama-3's 128,256-token
vocabulary, a third of what training the 8B needs on a GPU (docs/rehearsal.md). Under LoRA the
head is frozen, so the only gradient the loss has to give is the hidden states'. Here it is
computed in the forward, a chunk of positions at a time: d(summed NLL)/d(logits) = softmax -
one-hot, times the head's weight. Autograd keeps only that B x T x d gradient, and the
backward costs the same one matmul over the head as before. The numbers are the same loss and
gradient up to float rounding order.

The chunk is smaller than evaluation's (`scoring.HEAD_CHUNK_POSITIONS`, 1,024): the loss runs at
the end of the forward, when everything autograd saves for the backward is alive, so its
temporaries (a chunk's logits and logsumexp's copy, 8 bytes a logit) add to the stage's peak.
256 positions of Llama-3's vocabulary are 0.25 GiB; the head's matmul over them still has
256 x d x V multiply-adds, plenty to keep a GPU busy.

A model whose head is trained, not a plain linear map, or post-processed (soft-capping, a
logit scale) takes transformers' own loss.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from qlora_pipeline.scoring import body_and_head

CHUNK_POSITIONS = 256


class _FrozenHeadNLL(torch.autograd.Function):
    """Mean next-token NLL of `hidden` [N, d] under a frozen head (`weight` [V, d], `bias`),
    with the gradient of `hidden` made in the forward, `chunk` positions at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = torch.nn.functional.linear(hidden[start:stop], weight, bias).float()
            picked = targets[start:stop, None]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (lse - logits.gather(1, picked)).sum()
            if want_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, picked, torch.full_like(picked, -1.0, dtype=probs.dtype))
                grad[start:stop] = probs.to(weight.dtype) @ weight
            del logits
        ctx.n = n
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss / ctx.n), None, None, None, None


def _unwrapped(model):
    """The transformers model inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def frozen_head(model) -> Optional[torch.nn.Linear]:
    """The head of `model` (a transformers causal LM, or a PEFT model around one) when the loss
    may take the chunked path: a plain linear map whose weights are not trained."""
    parts = body_and_head(_unwrapped(model))
    if parts is None:
        return None
    head = parts[1]
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    return head


@contextmanager
def _hidden_states_out(model):
    """While inside, `model`'s forward returns its last hidden states where the logits were."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


def next_token_loss(forward, model, batch: torch.Tensor, chunk: int = CHUNK_POSITIONS) -> torch.Tensor:
    """Mean next-token NLL of the windows `batch` [B, L] (tokens 1..L-1 predicted), to
    backpropagate. `forward` is what runs the model (the distributed wrapper around `model`, or
    `model` itself: gradients must go through the wrapper to be synchronised)."""
    head = frozen_head(model)
    if head is None:
        return forward(input_ids=batch, labels=batch).loss
    with _hidden_states_out(model):
        hidden = forward(input_ids=batch).logits
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = batch[:, 1:].reshape(-1)
    return _FrozenHeadNLL.apply(hidden, head.weight, head.bias, targets, chunk)
