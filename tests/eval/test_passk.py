from fractions import Fraction
from math import comb

import pytest

from megatron_ntp.eval.passk import (
    avg_at_k,
    cons_at_k,
    exact_match,
    extract_last_number,
    numeric_match,
    pass_at_k,
)


@pytest.mark.parametrize("k, want", [(1, 2 / 5), (2, 7 / 10), (3, 9 / 10), (4, 1.0), (5, 1.0)])
def test_pass_at_k_by_hand_m5_c2(k, want):
    # 1 - C(3, k) / C(5, k): k=1 -> 1 - 3/5, k=2 -> 1 - 3/10, k=3 -> 1 - 1/10, k>=4 -> 1
    assert pass_at_k(5, 2, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_matches_binomials_for_large_m():
    for m, c, k in [(128, 0, 64), (128, 1, 64), (128, 17, 64), (128, 127, 1), (200, 3, 100)]:
        want = 1 - comb(m - c, k) / comb(m, k)
        assert pass_at_k(m, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="c=6, m=5"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(5, 2, 0)


def test_avg_and_cons():
    assert avg_at_k([True, False, True, False, False]) == pytest.approx(0.4)
    answers = [Fraction(3), None, Fraction(4), Fraction(3), Fraction(4), Fraction(5)]
    assert cons_at_k(answers, "3", numeric_match)  # tie 3 vs 4: the first seen wins
    assert not cons_at_k(answers, "4", numeric_match)
    assert not cons_at_k([None, None], "4", numeric_match)


def test_checkers():
    assert extract_last_number("so the answer is 1,234.50 apples") == Fraction("1234.5")
    assert extract_last_number("no digits") is None
    assert numeric_match("3.50", "7/2") and not numeric_match("3.5", "3.49")
    assert exact_match(" Paris ", "Paris") and not exact_match("paris", "Paris")
