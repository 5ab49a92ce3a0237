"""Uncertainty of eval numbers: Wilson intervals, paired audio-vs-control comparisons, tests against chance.

Expected values come from textbooks, published worked examples, SciPy or brute force — never from the
module under test.
"""

from __future__ import annotations

import itertools
import math

import pytest

from ralm.eval.significance import (
    binomial_p_above_chance,
    format_gap,
    mcnemar_exact_p,
    paired_comparison,
    poisson_binomial_tail,
    wilson_interval,
)


def _paired(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


# ---------------------------------------------------------------------------------------------- Wilson
def test_wilson_interval_textbook_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # Wilson's upper bound at 0/n is z^2 / (n + z^2)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-12)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + 1.96**2), abs=1e-12)


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (None, None)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    lo, hi = wilson_interval(32, 87)  # ~ the demo's size: about +-10 points
    assert 0.18 < hi - lo < 0.22 and lo < 32 / 87 < hi


# ---------------------------------------------------------------------------------------------- McNemar
def test_mcnemar_exact_p_hand_computed():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)  # 2 * P(X = 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact_p(1, 5) == pytest.approx(2 * (1 + 6) / 64)
    assert mcnemar_exact_p(4, 4) == 1.0
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8 (Cavo et al. 2012).
    assert mcnemar_exact_p(6, 16) == pytest.approx(0.052479, abs=1e-6)


@pytest.mark.parametrize("a_only, b_only", [(12, 9), (3, 0), (40, 9), (0, 17), (25, 25), (150, 120)])
def test_mcnemar_exact_p_matches_scipy(a_only, b_only):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(a_only, b_only) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------- paired
def test_paired_comparison_lengths_must_match():
    with pytest.raises(ValueError, match="same items"):
        paired_comparison([True, False], [True])


def test_paired_ci_matches_published_newcombe_example():
    # Cavo et al. 2012 as a paired table [[59, 6], [16, 80]]: Newcombe square-and-add -0.0621
    # (95% CI -0.1186 to -0.0046) in Fagerland, Lydersen & Laake, ch. 8.
    r = paired_comparison(*_paired(59, 6, 16, 80))
    assert r["delta"] == pytest.approx(-10 / 161)
    lo, hi = r["ci95"]
    assert lo == pytest.approx(-0.1186, abs=1e-4) and hi == pytest.approx(-0.0046, abs=1e-4)
    assert (r["a_right_b_wrong"], r["a_wrong_b_right"]) == (6, 16)


def test_clearly_better_audio_is_significant():
    a, b = _paired(20, 40, 9, 18)  # 60/87 vs 29/87
    r = paired_comparison(a, b)
    assert (r["accuracy_a"], r["accuracy_b"]) == (pytest.approx(60 / 87), pytest.approx(29 / 87))
    assert r["delta"] == pytest.approx(31 / 87)
    assert r["mcnemar_p"] < 0.001
    assert 0 < r["ci95"][0] < r["delta"] < r["ci95"][1] <= 1
    swapped = paired_comparison(b, a)  # the same gap the other way round
    assert swapped["delta"] == pytest.approx(-31 / 87) and swapped["mcnemar_p"] == r["mcnemar_p"]
    assert swapped["ci95"][1] < 0


def test_equal_conditions_give_no_difference():
    a = [True, False, True, True, False] * 10
    r = paired_comparison(a, list(a))
    assert r["delta"] == 0 and r["mcnemar_p"] == 1.0
    assert r["a_right_b_wrong"] == r["a_wrong_b_right"] == 0
    assert r["ci95"][0] <= 0 <= r["ci95"][1]


def test_small_noisy_gap_is_not_significant():
    a, b = _paired(20, 12, 9, 46)  # ~ "36.8% vs 33.3%" on 87 items
    r = paired_comparison(a, b)
    assert r["delta"] == pytest.approx(3 / 87)
    assert r["mcnemar_p"] > 0.05 and r["ci95"][0] < 0 < r["ci95"][1]
    text = format_gap(r["delta"], r["ci95"], r["mcnemar_p"], (r["a_right_b_wrong"], r["a_wrong_b_right"]))
    assert text.startswith("+3.4 points (95% CI -") and "12 vs 9 discordant items" in text
    assert text.endswith("not significant at p < 0.05")


def test_paired_comparison_empty():
    r = paired_comparison([], [])
    assert r["n"] == 0 and r["delta"] is None and r["mcnemar_p"] == 1.0


# ---------------------------------------------------------------------------------------------- chance
def _brute_tail(k: int, probs: list[float]) -> float:
    total = 0.0
    for outcome in itertools.product([0, 1], repeat=len(probs)):
        if sum(outcome) >= k:
            total += math.prod(p if o else 1 - p for o, p in zip(outcome, probs, strict=True))
    return total


@pytest.mark.parametrize("probs", [[0.25, 0.5, 1 / 3], [0.25] * 6, [0.5, 0.2, 0.25, 1 / 3, 0.1, 0.25, 0.5],
                                   [0.9, 0.01, 0.5, 0.3]])
def test_poisson_binomial_tail_matches_brute_force(probs):
    for k in range(len(probs) + 2):
        assert poisson_binomial_tail(k, probs) == pytest.approx(_brute_tail(k, probs), rel=1e-12, abs=1e-15)


def test_p_above_chance():
    assert binomial_p_above_chance(0, 0, 0.25) is None
    # 2 right of 3 items with 4, 4 and 3 choices: P(all 3) + P(exactly 2) = 1/48 + 8/48.
    assert binomial_p_above_chance(2, 3, [0.25, 0.25, 1 / 3]) == pytest.approx(9 / 48)
    assert binomial_p_above_chance(0, 3, [0.25, 0.25, 1 / 3]) == 1.0
    with pytest.raises(ValueError):
        binomial_p_above_chance(2, 3, [0.25, 0.25])


@pytest.mark.parametrize("correct, total, chance", [(30, 87, 0.25), (32, 87, 0.363), (60, 87, 1 / 3), (5, 87, 0.25)])
def test_p_above_chance_matches_scipy_binomial(correct, total, chance):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(correct, total, chance, alternative="greater").pvalue
    assert binomial_p_above_chance(correct, total, chance) == pytest.approx(expected, rel=1e-9)
