"""GPTQ's math on controlled problems: exactness of what it stores, and the error it saves."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_quant.gptq import accumulate_hessian, fit_group_params, gptq_quantize, quantize_codes, rtn_quantize


@pytest.fixture
def problem():
    torch.manual_seed(0)
    X = torch.randn(4096, 256) @ (torch.randn(256, 256) * 0.2) + torch.randn(256) * 2  # correlated inputs
    W = torch.randn(96, 256) * 0.05
    H, n = None, 0
    for chunk in X.split(1000):
        H, n = accumulate_hessian(H, n, chunk)
    return X, W, H


def output_error(X, W, Q) -> float:
    return ((X @ (Q - W).t()) ** 2).mean().item()


def test_hessian_is_the_running_average(problem):
    X, _, H = problem
    torch.testing.assert_close(H, 2 / X.shape[0] * X.t() @ X, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_round_to_nearest_and_stores_exactly_what_it_computes(problem, act_order, static, sym):
    X, W, H = problem
    r = rtn_quantize(W, 4, 64, sym)
    g = gptq_quantize(W, H, 4, 64, sym, act_order, static, 0.01, scale_dtype=torch.float16)
    assert output_error(X, W, g.Q) < 0.7 * output_error(X, W, r.Q)
    gi = g.g_idx.long()
    assert torch.equal(g.Q, g.scales[gi].t() * (g.codes - g.zeros[gi].t()))
    assert torch.equal(g.scales, g.scales.half().float())
    assert g.codes.min() >= 0 and g.codes.max() <= 15
    if static or not act_order:
        assert torch.equal(gi, torch.arange(256) // 64)
    else:
        assert sorted(gi.bincount().tolist()) == [64] * 4 and not torch.equal(gi, torch.arange(256) // 64)


def test_symmetric_zero_is_the_midpoint_and_quirk_for_positive_groups():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.4, 0.1, 0.2, 0.0]])
    p = fit_group_params(w, 4, sym=True)
    assert p.zero.tolist() == [8.0, 8.0]
    codes = quantize_codes(w, p, 15)
    assert codes[0].max() <= 15 and codes[0].min() >= 8  # an all-positive row keeps 7 positive levels


def test_dead_columns_and_damping(problem):
    X, W, H = problem
    H = H.clone()
    H[:, 5] = 0
    H[5, :] = 0
    g = gptq_quantize(W, H, 4, 64, False, False, False, 0.01)
    assert torch.isfinite(g.Q).all() and (g.Q[:, 5] == 0).all()
    singular = torch.zeros(256, 256)
    singular[0, 0] = 1.0
    g = gptq_quantize(W, singular + 1e-12, 4, 64, False, True, False, 0.01)
    assert torch.isfinite(g.Q).all()


def test_mse_range_search_lowers_weight_error():
    torch.manual_seed(1)
    W = torch.randn(64, 128) ** 3  # heavy tails: clipping helps
    plain = rtn_quantize(W, 4, 64, False)
    searched = rtn_quantize(W, 4, 64, False, mse=True)
    assert ((searched.Q - W) ** 2).sum() < ((plain.Q - W) ** 2).sum()


def test_per_row_and_two_bit(problem):
    X, W, H = problem
    g = gptq_quantize(W, H, 2, -1, False, True, False, 0.01)
    assert g.scales.shape == (1, 96) and g.codes.max() <= 3
    assert output_error(X, W, g.Q) < output_error(X, W, rtn_quantize(W, 2, -1, False).Q)


def _inverse_factor_keeping_copies(H, damp_percent, damp_step=0.01):
    """`_inverse_factor` as it was before the [in, in] copies were dropped early (commit 8ce3d48)."""
    diag_mean = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent
    while True:
        Hd = H.clone()
        Hd[idx, idx] += damp * diag_mean
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, damp
        if damp >= 1.0:
            raise ValueError("not positive definite")
        damp = min(1.0, damp + damp_step)


@pytest.mark.parametrize("act_order,static,damp", [(False, False, 0.01), (True, True, 0.01), (True, False, 0.0)])
def test_dropping_hessian_copies_early_changes_no_byte(problem, monkeypatch, act_order, static, damp):
    """The memory change in `_inverse_factor`/`gptq_quantize` (del of each [in, in] copy once
    used) gives exactly the old outputs, including the damping retries (damp 0 on a rank-
    deficient H)."""
    import qlora_quant.gptq as gptq

    X, W, H = problem
    if damp == 0.0:  # rank 20 of 256: not positive definite until damped
        H = accumulate_hessian(None, 0, X[:20])[0]
    new = gptq_quantize(W, H, 4, 16, act_order=act_order, static_groups=static, damp_percent=damp)
    monkeypatch.setattr(gptq, "_inverse_factor", lambda make, damp: _inverse_factor_keeping_copies(make(), damp))
    old = gptq_quantize(W, H, 4, 16, act_order=act_order, static_groups=static, damp_percent=damp)
    for a, b in zip(new, old):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b
    if damp == 0.0:
        assert new.damp_percent > 0  # the retry loop ran


class _LiveSquares(TorchDispatchMode):
    """Counts the [n, n] tensors made inside the block that are alive at each op (tensors made
    before it, such as the caller's H, are not counted)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.refs, self.peak = n, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (self.n, self.n):
                self.refs.append(weakref.ref(t))
        self.peak = max(self.peak, len({id(t) for r in self.refs if (t := r()) is not None}))
        return out


def test_inverse_factor_holds_at_most_two_square_copies():
    """Live [in, in] tensors at any op inside `_inverse_factor`: 2 now (the working copy it
    damps in place, then each factor as it replaces the last); 5 in the form before commit
    8ce3d48 (the copy handed in, the damped clone, its Cholesky factor, the inverse and the
    inverse's factor)."""
    from qlora_quant.gptq import _inverse_factor

    n = 48
    A = torch.randn(n, 2 * n, dtype=torch.float64)
    H = A @ A.T / n
    counts = {}
    for name, fn in (("new", lambda: _inverse_factor(H.clone, 0.01)),
                     ("old", lambda: _inverse_factor_keeping_copies(H.clone(), 0.01))):
        mode = _LiveSquares(n)
        with mode:
            U, _ = fn()
        counts[name] = mode.peak
        del U
    assert counts == {"new": 2, "old": 5}, counts


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_quantize_makes_at_most_two_square_copies_of_the_callers_hessian(act_order):
    """The whole solve, act-order permutation included, holds at most two [in, in] tensors of
    its own next to the caller's H (which the layer engine keeps for its error metrics): the
    working copy and its factor. Before, it held three (its clone, then the permuted copy made
    through a row-permuted temporary, then the damped copy and its factor): 0.8 GB more at
    Llama-3-8B's down_proj (in = 14,336), the stage's widest Hessian."""
    n = 64
    torch.manual_seed(0)
    X = torch.randn(4 * n, n)
    H = accumulate_hessian(None, 0, X)[0]
    W = torch.randn(16, n)
    mode = _LiveSquares(n)
    with mode:
        gptq_quantize(W, H, 4, 16, act_order=act_order, static_groups=act_order)
    assert mode.peak == 2, mode.peak


@pytest.mark.parametrize("act_order", [False, True])
def test_the_working_copy_is_the_matrix_the_solve_factored_before(monkeypatch, act_order):
    """The one-gather working copy equals, bit for bit, what the solve factored before it: H
    cloned, dead columns' diagonal set to 1, then permuted rows and columns in two steps."""
    import qlora_quant.gptq as gptq

    torch.manual_seed(0)
    X = torch.randn(256, 64)
    X[:, 3] = 0  # a dead column
    H = accumulate_hessian(None, 0, X)[0]
    seen = {}

    def capture(make, damp):
        seen["H"] = make()
        return _inverse_factor_keeping_copies(seen["H"].clone(), damp)

    monkeypatch.setattr(gptq, "_inverse_factor", capture)
    gptq_quantize(torch.randn(16, 64), H, 4, 16, act_order=act_order, static_groups=act_order)
    before = H.clone()
    dead = torch.diag(before) == 0
    before[dead, dead] = 1
    if act_order:
        perm = torch.argsort(torch.diag(before), descending=True)
        before = before[perm][:, perm]
    assert torch.equal(seen["H"], before)
