"""How sure a perplexity comparison is: the change of one model's perplexity over another's on the
same evaluation windows, with a 95% interval from the spread of the per-window differences.

Both models see the same windows, so most of what makes one window harder than another cancels
in the difference; what is left is how unevenly the change is spread over the text. With d_i
the difference of the two models' summed NLL on window i (n windows of T predicted tokens each):

    log(ppl_a / ppl_b) = sum(d) / (n T),   standard error = sqrt(n var(d)) / (n T)

and the interval is exp(log ratio ± t SE) - 1, in percent, t the 97.5% quantile of Student's t
with n - 1 degrees of freedom (2.04 for the default recipe's 33 windows). The windows are treated as
independent samples; neighbouring windows of one document are not quite (a topic a model handles
badly spans several), so the interval is a lower bound on the uncertainty, not an exact one. It
says nothing about the choice of evaluation text itself.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

# The 97.5% quantile of Student's t for 1..10 degrees of freedom (standard tables); above that,
# its Cornish-Fisher expansion around the normal quantile, within 1e-3 of the true value from 11 on.
_T_975_SMALL = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_Z_975 = 1.959964


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (a two-sided 95% interval)."""
    if dof <= len(_T_975_SMALL):
        return _T_975_SMALL[dof - 1]
    z = _Z_975
    return (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3))


class PairedChange(NamedTuple):
    """Model a's perplexity over model b's, in percent, with its 95% interval."""

    percent: float
    low: float
    high: float
    windows: int

    @property
    def half_width(self) -> float:
        """Half the interval's width, in percentage points (exp() makes a wide interval lopsided:
        the report shows both ends then)."""
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval says the two models differ on this text."""
        return self.low > 0 or self.high < 0


def paired_change(a_window_nlls: Sequence[float], b_window_nlls: Sequence[float],
                  tokens_per_window: int) -> Optional[PairedChange]:
    """Model a against model b from their summed NLLs on the same windows (in the same order);
    None when they were not scored on the same number of windows or on fewer than 2."""
    n = len(a_window_nlls)
    if n != len(b_window_nlls) or n < 2 or tokens_per_window < 1:
        return None
    diffs = [float(a) - float(b) for a, b in zip(a_window_nlls, b_window_nlls)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    tokens = n * tokens_per_window
    log_ratio = sum(diffs) / tokens
    se = math.sqrt(n * variance) / tokens
    to_percent = lambda x: 100 * math.expm1(x)
    t = t_quantile_975(n - 1)
    return PairedChange(to_percent(log_ratio), to_percent(log_ratio - t * se), to_percent(log_ratio + t * se), n)
