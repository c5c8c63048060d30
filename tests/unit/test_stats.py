from collections import Counter

import pytest

from tests.stats import chi_square_uniform


def test_uniform_split_has_high_p_value():
    stat, p = chi_square_uniform(Counter(a=100, b=100, c=100), ["a", "b", "c"])
    assert stat == 0 and p == pytest.approx(1.0)


def test_known_critical_values():
    # chi2(df=2) survival at 13.816 is 0.001; chi2(df=4) at 9.488 is 0.05 (textbook tables).
    from tests.stats import _lower_gamma_regularized

    assert 1 - _lower_gamma_regularized(1.0, 13.816 / 2) == pytest.approx(0.001, rel=1e-3)
    assert 1 - _lower_gamma_regularized(2.0, 9.488 / 2) == pytest.approx(0.05, rel=1e-3)


def test_skewed_split_has_tiny_p_value():
    _, p = chi_square_uniform(Counter(a=300, b=0, c=0), ["a", "b", "c"])
    assert p < 1e-6
