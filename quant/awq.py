"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then clipping, then 4-bit groups.

Written from docs/formats.md#awq-algorithm. Pure functions: tensors in, tensors out; the loss of a
scale candidate is a callable the caller provides (it runs the inspected block).

Notation:
    W       weight [out, in]; a scaling group is several linears reading the same input x [n, in]
    s       per-input-channel scale [in]: the group's weights become W diag(s), the op before
            them absorbs diag(1/s), so the float function is unchanged and only rounding moves
    Q(.)    group pseudo-quantization (quantize then dequantize)

Two departures from the reference implementations, both exact rewrites of the same objective:
- The loss of a group whose inspected block is a single linear (o_proj, down_proj) is
  mean((x (W - Q(W s)/s)^T)^2) = tr(D H D^T) / (n out) with H = X^T X, so it is computed from
  the Hessian instead of a forward over every token: out*in^2 multiply-adds against out*in*n.
  With fewer tokens than input channels (n < in: a small calibration set at a wide layer, such
  as 4,096 tokens into Llama-3-8B's 14,336-wide down_proj) the forward is the cheaper of the
  two, and the caller keeps the inputs instead of H (`linear_loss_from_inputs`).
- The clipping error per (row, group) is mean_t (x_g . d_g)^2 = d_g^T G_g d_g with G_g the
  group's diagonal block of X^T X / n, so the search sees every calibration token (the
  references subsample 512) at a fraction of the cost.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from qlora_quant.gptq import group_width, rtn_quantize

__all__ = [
    "pseudo_quantize",
    "weight_channel_mean",
    "candidate_scales",
    "search_scales",
    "ScaleSearch",
    "linear_loss_from_hessian",
    "linear_loss_from_inputs",
    "gram_blocks",
    "scaled_gram_blocks",
    "scaled_gram_blocks_from_inputs",
    "search_clip",
    "clip_weight",
]

N_GRID = 20  # scale ratios k/20, k = 0..19; clip shrink 1 - k/20, k = 0..9 (max_shrink 0.5)


def pseudo_quantize(W: torch.Tensor, bits: int, group_size: int, scale_dtype: Optional[torch.dtype] = torch.float16) -> torch.Tensor:
    """Asymmetric min/max group quantization of W [out, in], returned dequantized: GPTQ's
    round-to-nearest grid (the range of each group widened to include 0; AWQ's own grid does
    not, which only matters for groups of one sign). Scales are rounded to `scale_dtype`, as the
    packed checkpoint stores them, so this is exactly the weight the checkpoint decodes to."""
    return rtn_quantize(W, bits, group_size, sym=False, scale_dtype=scale_dtype).Q


def weight_channel_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """w_mean [in]: mean over output rows of |w| / absmax of its group (AutoAWQ's duo statistic),
    over the group's weights concatenated along the output dimension."""
    W = torch.cat([w.float() for w in weights], dim=0)
    out_f, in_f = W.shape
    gs = group_width(group_size, in_f)
    w = W.abs().reshape(out_f, in_f // gs, gs)
    w = w / (w.amax(dim=2, keepdim=True) + 1e-6)
    return w.reshape(out_f, in_f).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: Optional[torch.Tensor], ratio: float) -> torch.Tensor:
    """One grid point: s = x_mean^r / w_mean^(1-r) (duo) or x_mean^r, normalized so that
    max(s) * min(s) = 1."""
    x = x_mean.float()
    if w_mean is None:
        s = x.pow(ratio).clamp(min=1e-4)
    else:
        s = (x.pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return s / (s.max() * s.min()).sqrt()


class ScaleSearch(NamedTuple):
    """The best grid point: scales [in], its ratio and loss; and the loss of every grid point."""

    scales: torch.Tensor
    ratio: float
    loss: float
    losses: list[float]


def search_scales(x_mean: torch.Tensor, w_mean: Optional[torch.Tensor],
                  loss_of: Callable[[torch.Tensor], float], n_grid: int = N_GRID) -> ScaleSearch:
    """Grid search of the scale exponent: `loss_of(s)` is the inspected block's output error
    with the group's weights replaced by Q(W diag(s)) diag(1/s)."""
    best: Optional[ScaleSearch] = None
    losses = []
    for k in range(n_grid):
        ratio = k / n_grid
        s = candidate_scales(x_mean, w_mean, ratio)
        loss = float(loss_of(s))
        losses.append(loss)
        if best is None or loss < best.loss:
            best = ScaleSearch(s, ratio, loss, [])
    assert best is not None
    return best._replace(losses=losses)


def scaled_quantized(W: torch.Tensor, s: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Q(W diag(s)) diag(1/s): the weight a candidate scale leaves in the unscaled basis."""
    return pseudo_quantize(W.float() * s, bits, group_size) / s


def linear_loss_from_hessian(D: torch.Tensor, XtX: torch.Tensor, n_tokens: int) -> float:
    """mean over tokens and outputs of (x D^T)^2, from XtX = X^T X (not averaged)."""
    return float(((D @ XtX) * D).sum()) / (n_tokens * D.shape[0])


def linear_loss_from_inputs(D: torch.Tensor, X: torch.Tensor) -> float:
    """mean over tokens and outputs of (x D^T)^2 from the inputs X [n, in] themselves: the value
    `linear_loss_from_hessian` gives, at out*in*n multiply-adds instead of out*in^2."""
    return float((X @ D.t()).square().sum()) / (X.shape[0] * D.shape[0])


def gram_blocks(XtX_over_n: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks [groups, g, g] of the input Gram matrix."""
    in_f = XtX_over_n.shape[0]
    gs = group_width(group_size, in_f)
    n = in_f // gs
    idx = torch.arange(n, device=XtX_over_n.device)
    return XtX_over_n.reshape(n, gs, n, gs)[idx, :, idx, :]


def scaled_gram_blocks(XtX: torch.Tensor, n_tokens: int, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks [groups, g, g] of diag(1/s) (X^T X / n) diag(1/s): the Gram matrix of
    the inputs once the scales s are folded. The blocks are taken first, so no other [in, in]
    matrix is made (down_proj's is 0.8 GB at Llama-3-8B's width); the element-wise operations
    are those of the whole-matrix form, in its order, so the values are the same."""
    return _fold_scales(gram_blocks(XtX, group_size), n_tokens, s)


def scaled_gram_blocks_from_inputs(X: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """`scaled_gram_blocks` computed from the inputs X [n, in] (each group's X_g^T X_g), for a
    caller that keeps X instead of X^T X (n < in)."""
    n, in_f = X.shape
    gs = group_width(group_size, in_f)
    Xg = X.reshape(n, in_f // gs, gs)
    return _fold_scales(torch.einsum("nga,ngb->gab", Xg, Xg), n, s)


def _fold_scales(blocks: torch.Tensor, n_tokens: int, s: torch.Tensor) -> torch.Tensor:
    """Gram blocks [groups, g, g] summed over n_tokens -> their mean, with 1/s folded in on both
    sides; one expression for both callers, so the two forms round identically."""
    s_blocks = s.reshape(blocks.shape[0], blocks.shape[1])
    return (blocks / n_tokens) / s_blocks.unsqueeze(1) / s_blocks.unsqueeze(2)


def search_clip(W: torch.Tensor, grams: torch.Tensor, bits: int, group_size: int,
                n_grid: int = N_GRID, max_shrink: float = 0.5, rows_per_batch: int = 1024) -> torch.Tensor:
    """Best symmetric clip value per (row, group) of W [out, in] (already scaled).

    For shrink factors 1, 1 - 1/n_grid, ... > 1 - max_shrink, clamp the group to
    [-m, m] with m = shrink * absmax, pseudo-quantize, and keep the m with the lowest
    mean_t (x_g . (w_g - q_g))^2, computed from the group's Gram block.

    Returns:
        float32 [out, groups] clip values.
    """
    out_f, in_f = W.shape
    gs = group_width(group_size, in_f)
    ng = in_f // gs
    best_max = torch.empty(out_f, ng, dtype=torch.float32, device=W.device)
    grams = grams.float()
    for r0 in range(0, out_f, rows_per_batch):
        w = W[r0 : r0 + rows_per_batch].float()
        rows = w.shape[0]
        org_max = w.reshape(rows, ng, gs).abs().amax(dim=2)
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for k in range(int(max_shrink * n_grid)):
            m = org_max * (1 - k / n_grid)
            clamped = clip_weight(w, m)
            d = (w - pseudo_quantize(clamped, bits, gs)).reshape(rows, ng, gs)
            err = torch.einsum("rgi,gij,rgj->rg", d, grams, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        best_max[r0 : r0 + rows] = best
    return best_max


def clip_weight(W: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp every group of W [out, in] to [-max, max] with max [out, groups]."""
    out_f, in_f = W.shape
    ng = max_val.shape[1]
    m = max_val.reshape(out_f, ng, 1)
    return torch.max(torch.min(W.reshape(out_f, ng, -1), m), -m).reshape(out_f, in_f)
