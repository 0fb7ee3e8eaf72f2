"""GPTQ (Frantar et al., 2022): layer-wise quantization with second-order error compensation.

Written from docs/formats.md#gptq-algorithm. Pure functions: tensors in, tensors out.

Notation (the paper's):
    W      weight [out, in] (float32 working copy)
    H      Hessian of the layer's reconstruction loss, 2/n * sum x x^T over the n input rows
    Hinv   upper Cholesky factor U of H^-1 (H^-1 = U^T U)
    Q      quantized-dequantized weight; Err1 the scaled errors of a block of columns
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Optional

import torch

__all__ = [
    "GroupParams",
    "GPTQResult",
    "accumulate_hessian",
    "fit_group_params",
    "quantize_codes",
    "rtn_quantize",
    "gptq_quantize",
]


class GroupParams(NamedTuple):
    """Per-row scale and integer zero of one group of columns: both [out]."""

    scale: torch.Tensor
    zero: torch.Tensor


class GPTQResult(NamedTuple):
    """Attributes:
    codes: int32 [out, in], integer codes in [0, 2^bits - 1], in the original column order.
    scales: float32 [n_groups, out].
    zeros: int32 [n_groups, out] (true zero points, no -1 convention).
    g_idx: int32 [in], the group of every input column.
    Q: float32 [out, in], the dequantized weight (scales[g_idx] * (codes - zeros[g_idx])).
    loss: float, the sum over columns of (w - q)^2 / d^2 / 2 (0 for round-to-nearest).
    damp_percent: float, the dampening that made H positive definite.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    Q: torch.Tensor
    loss: float
    damp_percent: float


def accumulate_hessian(H: Optional[torch.Tensor], n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running average of 2/n * X^T X over input rows.

    Args:
        H: the running Hessian [in, in] float32, or None to start.
        n: rows accumulated so far.
        x: new inputs [..., in].

    Returns:
        (H, n) updated.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    H *= n / (n + b)
    n += b
    x = x * (2 / n) ** 0.5
    H += x.t() @ x
    return H, n


def fit_group_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False,
                     grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4,
                     scale_dtype: Optional[torch.dtype] = None) -> GroupParams:
    """Scale and zero per row of `w` [out, cols], the range always including 0 (GQ `quant.py`).

    With `mse`, the range is shrunk by factors 1, 0.99, ... while that lowers sum |w - q|^norm.
    With `scale_dtype` (float16 for the packed formats), scales are rounded to it, so the
    codes and the dequantized weight are exactly those of the checkpoint.
    """
    maxq = 2**bits - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> GroupParams:
        scale = (hi - lo) / maxq
        if scale_dtype is not None:
            scale = scale.to(scale_dtype).float().clamp(min=torch.finfo(scale_dtype).tiny)
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.clamp(torch.round(-lo / scale), 0, maxq)
        return GroupParams(scale, zero)

    best = params(xmin, xmax)
    if mse:
        best_err = torch.full_like(xmin, float("inf"))
        scale, zero = best.scale.clone(), best.zero.clone()
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            cand = params(p * xmin, p * xmax)
            if sym:
                cand = GroupParams(cand.scale, best.zero)
            q = _dequant(quantize_codes(w, cand, maxq), cand)
            err = (q - w).abs().pow(norm).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, cand.scale, scale)
            zero = torch.where(better, cand.zero, zero)
        best = GroupParams(scale, zero)
    return best


def quantize_codes(w: torch.Tensor, p: GroupParams, maxq: int) -> torch.Tensor:
    """clamp(round(w / scale) + zero, 0, maxq) with per-row scale/zero ([out] or [out, 1])."""
    scale, zero = p.scale.reshape(-1, 1), p.zero.reshape(-1, 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _dequant(codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
    return p.scale.reshape(-1, 1) * (codes - p.zero.reshape(-1, 1))


def group_width(group_size: int, n_cols: int) -> int:
    """Columns per quantization group: `group_size`, or the whole row for -1."""
    return n_cols if group_size == -1 else group_size


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False,
                 scale_dtype: Optional[torch.dtype] = None) -> GPTQResult:
    """Round-to-nearest with the same grid and groups as GPTQ (the baseline every report shows).

    Every (row, group) is one row of `fit_group_params`, so all groups are fitted at once."""
    W = W.float()
    out_f, in_f = W.shape
    gs = group_width(group_size, in_f)
    n_groups = in_f // gs
    maxq = 2**bits - 1
    rows = W.reshape(out_f * n_groups, gs)
    p = fit_group_params(rows, bits, sym, mse, scale_dtype=scale_dtype)
    codes = quantize_codes(rows, p, maxq)
    Q = _dequant(codes, p).reshape(out_f, in_f)
    scales_t = p.scale.reshape(out_f, n_groups).t().contiguous()
    zeros_t = p.zero.reshape(out_f, n_groups).t().contiguous()
    g_idx = torch.arange(in_f, device=W.device) // gs
    return GPTQResult(codes.reshape(out_f, in_f).int(), scales_t, zeros_t.int(), g_idx.int(), Q, 0.0, 0.0)


def _inverse_factor(working_copy: Callable[[], torch.Tensor], damp_percent: float,
                    damp_step: float = 0.01) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until H is
    positive definite (GM `hessian_inverse`). `working_copy()` returns a fresh H this function
    owns: it is damped in place and dropped once factored, and made again for a retry, so at
    most two [in, in] tensors are alive here (the one being factored and its factor)."""
    H = working_copy()
    diag_mean = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent
    while True:
        H[idx, idx] += damp * diag_mean
        L, info = torch.linalg.cholesky_ex(H)
        del H  # [in, in] each: drop every copy as soon as it is used (memory only)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                return U, damp
        else:
            del L
        if damp >= 1.0:
            raise ValueError(f"Hessian is not positive definite even with damp_percent={damp:.2f}")
        damp = min(1.0, damp + damp_step)
        H = working_copy()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch's CPU ops single-threaded within the block. The column loop of the solve is
    thousands of tiny ops on vectors of a few hundred floats: split across threads they wait on
    each other, and when the machine is busy (another process on a core) a thread that is not
    scheduled stalls every op (seen as a many-fold slowdown of this loop on a busy 2-core
    machine; the stage's time against its floor is `scripts/bench_quantize_floor.py`)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                  act_order: bool = False, static_groups: bool = False, damp_percent: float = 0.01,
                  blocksize: int = 128, mse: bool = False, scale_dtype: Optional[torch.dtype] = None) -> GPTQResult:
    """Quantize W [out, in] given the Hessian H [in, in] of its inputs (GQ `fasterquant`).

    Args:
        act_order: process columns in decreasing diag(H) (desc_act); g_idx then maps each
            column to its group, which is not monotonic unless `static_groups`.
        static_groups: fit every group's parameters on the unmodified W before any update,
            so groups stay consecutive column ranges (g_idx = j // group_size).
        mse: search the clipping range of each group (see `fit_group_params`).

    Returns:
        A `GPTQResult` in the original column order.
    """
    W = W.float().clone()
    H = H.float()  # the caller's when it is float32 already: read here, never written
    out_f, in_f = W.shape
    gs = group_width(group_size, in_f)
    maxq = 2**bits - 1

    dead = torch.diag(H) == 0
    W[:, dead] = 0

    static: list[GroupParams] = []
    if static_groups:
        static = [fit_group_params(W[:, g0 : g0 + gs], bits, sym, mse, scale_dtype=scale_dtype)
                  for g0 in range(0, in_f, gs)]

    perm = torch.arange(in_f, device=W.device)
    if act_order:
        diag = torch.diag(H).clone()
        diag[dead] = 1
        perm = torch.argsort(diag, descending=True)
        W = W[:, perm]
    invperm = torch.argsort(perm)

    def working_copy() -> torch.Tensor:
        """H with dead columns' diagonal set to 1, in processing order: one gather (or clone)
        of the caller's H, the only [in, in] copy made here (the widest is 0.8 GB at
        Llama-3-8B's MLP width)."""
        Hw = H[perm[:, None], perm] if act_order else H.clone()
        dead_w = dead[perm]
        Hw[dead_w, dead_w] = 1
        return Hw

    Hinv, damp = _inverse_factor(working_copy, damp_percent)
    # The solve walks W column by column. It works on W transposed ([in, out], contiguous), so
    # that a column is a contiguous row: the per-column updates (round, error, the rank-1
    # update of the block's later columns) then read and write contiguous memory instead of
    # strided columns, which made this loop the slowest part of the quantize stage on a CPU.
    Wt = W.t().contiguous()
    del W
    Qt = torch.zeros_like(Wt)
    Ct = torch.zeros_like(Wt)
    group_of_col: list[int] = [0] * in_f  # in processing order
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    static_group_of = (perm // gs).tolist() if act_order else [c // gs for c in range(in_f)]
    scale = zero = None  # [out] of the current group
    loss = 0.0

    with _one_cpu_thread(Wt.device):
        for i1 in range(0, in_f, blocksize):
            i2 = min(i1 + blocksize, in_f)
            W1 = Wt[i1:i2].clone()  # [block, out]: row i is column i1 + i of W
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if static_groups:
                    g = static_group_of[col]
                    scale, zero = static[g]
                    group_of_col[col] = g
                elif col % gs == 0:
                    # Fit on the columns as they are now, with the updates of this block's earlier
                    # columns (the reference implementations read the global W here, which misses
                    # them whenever group_size < blocksize).
                    group_cols = torch.cat([W1[i:], Wt[i2:]], dim=0)[:gs].t()
                    scale, zero = fit_group_params(group_cols, bits, sym, mse, scale_dtype=scale_dtype)
                    scales.append(scale)
                    zeros.append(zero)
                if not static_groups:
                    group_of_col[col] = len(scales) - 1
                w = W1[i]
                c = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
                q = scale * (c - zero)
                Ct[col] = c
                Qt[col] = q
                err = (w - q) / Hinv1[i, i]
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                Err1[i] = err
            loss += float((Err1**2).sum()) / 2  # sum over columns of (w - q)^2 / d^2 / 2
            Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1

    if static_groups:
        scales = [p.scale for p in static]
        zeros = [p.zero for p in static]
    scales_t, zeros_t = torch.stack(scales), torch.stack(zeros)
    Q, codes = Qt[invperm].t().contiguous(), Ct[invperm].t().contiguous()
    g_idx = torch.tensor(group_of_col, dtype=torch.long, device=Qt.device)[invperm]
    return GPTQResult(codes.int(), scales_t, zeros_t.int(), g_idx.int(), Q, loss, damp)
