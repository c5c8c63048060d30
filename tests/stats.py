"""Chi-square goodness of fit without SciPy: enough for 'is this split uniform?'."""

from __future__ import annotations

import math
from collections import Counter


def _lower_gamma_regularized(a: float, x: float) -> float:
    """P(a, x) by its power series (converges for every x >= 0)."""
    if x <= 0:
        return 0.0
    term = 1.0 / a
    total = term
    n = 1
    while n < 10_000:
        term *= x / (a + n)
        total += term
        if term < total * 1e-15:
            break
        n += 1
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def chi_square_uniform(counts: Counter[str], categories: list[str]) -> tuple[float, float]:
    """(statistic, p-value) of the observed counts against a uniform split over categories."""
    n = sum(counts[c] for c in categories)
    expected = n / len(categories)
    stat = sum((counts[c] - expected) ** 2 / expected for c in categories)
    df = len(categories) - 1
    return stat, 1.0 - _lower_gamma_regularized(df / 2, stat / 2)
