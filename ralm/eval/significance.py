"""How sure we can be of an eval's numbers: confidence intervals and exact tests (no SciPy needed).

Why: a held-out set of ~90 items gives each accuracy a 95% interval of about +-10 points, so a gap of a
few points between the real audio and a control can be noise. The report shows the intervals and tests
so a reader can tell.

- `wilson_interval`: the Wilson score interval of one accuracy (good coverage at small n and near 0 or 1,
  unlike the Wald interval p +- z*se, which collapses to a point at 0/n).
- `paired_comparison`: the same items under two conditions (real audio vs a control). Pairing matters:
  most items are right (or wrong) under both, and only the discordant items carry the difference.
  The interval is Newcombe's square-and-add interval for paired proportions (Newcombe 1998, Stat Med
  17:2635, method 10), deterministic and well-behaved with few discordant items; the test is McNemar's
  exact (conditional binomial) test.
- `binomial_p_above_chance`: the exact one-sided p-value that accuracy beats guessing, where items may
  have different numbers of choices (a Poisson-binomial distribution, computed exactly by a DP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.96  # two-sided 95%


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval for `correct / total`; (None, None) when `total` is 0 (no accuracy to
    bound — the same convention as the reports' `accuracy: None`)."""
    if not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got {correct} / {total}")
    if total == 0:
        return None, None
    p, z2 = correct / total, z * z
    denom = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    # The bounds are exactly 0 / 1 at 0/n and n/n; clamp rounding there.
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == total else min(1.0, center + half)
    return lo, hi


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each discordant item is a fair coin, so the
    smaller discordant count is Binomial(a_only + b_only, 1/2); doubled tail, capped at 1. Integer sums
    (math.comb) keep it exact for any n; 1.0 when there are no discordant items."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def _newcombe_paired_ci(both: int, a_only: int, b_only: int, neither: int, z: float) -> tuple[float, float]:
    """Newcombe's square-and-add interval for p_a - p_b on paired data: the Wilson intervals of the two
    accuracies combined with their estimated correlation (phi, shrunk towards 0 as Newcombe specifies)."""
    n = both + a_only + b_only + neither
    pa, pb = (both + a_only) / n, (both + b_only) / n
    la, ua = wilson_interval(both + a_only, n, z)
    lb, ub = wilson_interval(both + b_only, n, z)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - a_only * b_only
        # Newcombe's continuity adjustment of a positive correlation (none for a negative one).
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    d = pa - pb
    lo = d - math.sqrt(max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2))
    hi = d + math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def paired_comparison(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> dict[str, Any]:
    """Compare two conditions scored on the same items (`a[i]`, `b[i]`: item i right under each).

    Returns `n`, `accuracy_a`, `accuracy_b`, `delta` = acc(a) - acc(b), `ci95` = Newcombe's paired
    interval for delta, the discordant counts `a_right_b_wrong` / `a_wrong_b_right`, and `mcnemar_p`
    (exact, two-sided). With no items the accuracies, delta and interval are None and the p-value 1.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items under both conditions: {len(a)} vs {len(b)}")
    n = len(a)
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    out: dict[str, Any] = {"n": n, "a_right_b_wrong": a_only, "a_wrong_b_right": b_only,
                           "mcnemar_p": mcnemar_exact_p(a_only, b_only)}
    if n == 0:
        return {**out, "accuracy_a": None, "accuracy_b": None, "delta": None, "ci95": (None, None)}
    return {**out, "accuracy_a": (both + a_only) / n, "accuracy_b": (both + b_only) / n,
            "delta": (a_only - b_only) / n,
            "ci95": _newcombe_paired_ci(both, a_only, b_only, n - both - a_only - b_only, z)}


def poisson_binomial_tail(k: int, probs: Sequence[float]) -> float:
    """P(X >= k) for X = the number of successes among independent trials with success chances `probs`.

    A DP over the count so far (O(n * k), vectorised over the count so MMAU-sized sets take well under a
    second), with every count >= k folded into one absorbing tail: the tail is summed directly, never as
    1 - cdf, which would round a small p-value away."""
    if k <= 0:
        return 1.0
    if k > len(probs):
        return 0.0
    dist = np.zeros(k)  # dist[j]: P(j successes so far), for j < k
    dist[0] = 1.0
    tail = 0.0  # P(>= k successes so far)
    for p in probs:
        tail += dist[k - 1] * p
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return min(1.0, float(tail))


def binomial_p_above_chance(correct: int, total: int, chance: float | Sequence[float]) -> float | None:
    """Exact one-sided p-value of `correct` or more right answers out of `total` by guessing alone.

    `chance`: each item's guessing probability (1 / its number of choices), exact (Poisson-binomial);
    or one float for all items (Binomial). A float that is the *mean* over items with different numbers
    of choices is an approximation, and a conservative one above the mean (the binomial is the most
    spread-out distribution with that mean; Hoeffding 1956). None when there are no items.
    """
    if total == 0:
        return None
    probs = [float(chance)] * total if isinstance(chance, int | float) else [float(p) for p in chance]
    if len(probs) != total:
        raise ValueError(f"{len(probs)} chance probabilities for {total} items")
    return poisson_binomial_tail(correct, probs)


# ---------------------------------------------------------------------------------------------- plain words
ALPHA = 0.05


def format_p(p: float) -> str:
    """`p = 0.52`, `p = 0.052` (enough digits to tell which side of 0.05 it is), `p < 0.001`."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2f}" if p >= 0.1 else f"p = {p:.3f}"


def verdict(p: float, alpha: float = ALPHA) -> str:
    return f"{'significant' if p < alpha else 'not significant'} at p < {alpha:g}"


def format_gap(delta: float | None, ci95: Sequence[float | None], p: float, discordant: tuple[int, int]) -> str:
    """A paired comparison in words: `+3.5 points (95% CI -6.1 to +13.1; McNemar p = 0.52, 12 vs 9
    discordant items) — not significant at p < 0.05`. `discordant`: (right under a only, under b only)."""
    if delta is None or ci95[0] is None or ci95[1] is None:
        return "no items scored under both"
    return (f"{100 * delta:+.1f} points (95% CI {100 * ci95[0]:+.1f} to {100 * ci95[1]:+.1f}; McNemar "
            f"{format_p(p)}, {discordant[0]} vs {discordant[1]} discordant items) — {verdict(p)}")


def describe_vs_control(entry: dict[str, Any]) -> str:
    """An eval report's `vs_controls` entry (real audio vs one control) in words, via `format_gap`: the one
    reader of that entry's keys, shared by `eval/report.md` and the run report."""
    return format_gap(entry["delta"], entry["ci95"], entry["mcnemar_p"],
                      (entry["audio_right_control_wrong"], entry["audio_wrong_control_right"]))
