"""The paired interval of a perplexity change: its centre is the change the two perplexities give,
and its width is right (about 95% of intervals drawn from a known distribution hold the truth)."""
from __future__ import annotations

import math
import random

import pytest

from qlora_pipeline.paired import paired_change, t_quantile_975


def test_the_centre_is_the_ratio_of_the_two_perplexities():
    a = [1000.0, 1200.5, 900.25, 1100.0]
    b = [990.0, 1150.0, 905.0, 1050.0]
    tokens = 511
    ppl = lambda nlls: math.exp(sum(nlls) / (len(nlls) * tokens))
    pc = paired_change(a, b, tokens)
    assert pc.percent == pytest.approx(100 * (ppl(a) / ppl(b) - 1), rel=1e-12)
    assert pc.low < pc.percent < pc.high and pc.windows == 4


def test_a_uniform_change_has_no_spread_and_different_window_sets_are_not_compared():
    pc = paired_change([110.0, 210.0, 310.0], [100.0, 200.0, 300.0], 100)
    assert pc.low == pytest.approx(pc.percent) and pc.high == pytest.approx(pc.percent)
    assert pc.percent == pytest.approx(100 * math.expm1(0.1)) and pc.excludes_zero
    assert paired_change([1.0, 2.0], [1.0, 2.0, 3.0], 10) is None  # not the same windows
    assert paired_change([1.0], [2.0], 10) is None  # one window: no spread to measure


def test_the_interval_holds_the_true_change_about_95_percent_of_the_time():
    """Per-window differences with mean mu per window (true log ratio mu / T) and sd sigma, drawn
    many times: the share of intervals holding the truth is near 0.95 (within 3 standard errors of
    the share over 2000 draws). A standard error off by
    the factor sqrt(n) (the classic slip) gives about 0.34 or 1.0 here."""
    rng = random.Random(0)
    n, tokens, mu, sigma = 33, 511, 20.0, 40.0
    truth = 100 * math.expm1(mu / tokens)
    trials, held = 2000, 0
    for _ in range(trials):
        b = [rng.uniform(1000, 1500) for _ in range(n)]
        a = [x + rng.gauss(mu, sigma) for x in b]
        pc = paired_change(a, b, tokens)
        held += pc.low <= truth <= pc.high
    assert 0.935 <= held / trials <= 0.965, held / trials


@pytest.mark.parametrize("dof, table", [(1, 12.706), (10, 2.228), (11, 2.201), (12, 2.179), (15, 2.131), (20, 2.086), (32, 2.037), (120, 1.980)])
def test_students_t_quantile_against_the_printed_table(dof, table):
    assert t_quantile_975(dof) == pytest.approx(table, abs=1e-3)
