"""Pass@k, Avg@k and Cons@k over m sampled answers per problem (the paper's evaluation: m = 128 samples at temperature 0.7, top-p 0.95).

Pass@k uses the unbiased estimator of Chen et al. (2021): with c correct among m samples,
    pass@k = 1 - C(m - c, k) / C(m, k) = 1 - prod_{i = m - c + 1}^{m} (1 - k / i),
the product form being exact and free of huge binomials.
"""

import re
from collections import Counter
from fractions import Fraction
from typing import Callable, Sequence


def pass_at_k(m: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement is correct."""
    if not 0 <= c <= m:
        raise ValueError(f"need 0 <= c <= m, got c={c}, m={m}")
    if not 1 <= k <= m:
        raise ValueError(f"need 1 <= k <= m, got k={k}, m={m}")
    if m - c < k:
        return 1.0
    fail = 1.0
    for i in range(m - c + 1, m + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean accuracy over the samples."""
    if not correct:
        raise ValueError("avg@k needs at least one sample")
    return sum(map(bool, correct)) / len(correct)


def cons_at_k(answers: Sequence, reference, check: Callable) -> bool:
    """Majority vote over extracted answers (None = no answer, never voted); ties go to the
    answer seen first. True when the voted answer passes check(answer, reference)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return bool(check(winner, reference))


_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?")


def extract_last_number(text: str):
    """The last number in the text, as a Fraction (so 0.5 == 1/2), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].replace(",", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(answer, reference) -> bool:
    """Equal after stripping surrounding whitespace."""
    return answer is not None and str(answer).strip() == str(reference).strip()


def numeric_match(answer, reference) -> bool:
    """Equal as numbers (exactly, through fractions): '3.50' matches '7/2'."""
    if answer is None:
        return False
    a = answer if isinstance(answer, Fraction) else extract_last_number(str(answer))
    r = reference if isinstance(reference, Fraction) else extract_last_number(str(reference))
    return a is not None and r is not None and a == r
