"""Paired statistics over held-out examples: is an arm's held-out NLL lower than a reference arm's, by how much,
and how sure is that.

Both arms are evaluated on the same held-out examples, so the comparison is paired per example. Seeds are
strata that are averaged out first: for each example, its NLL is averaged over the arm's seeds (and over the
reference's seeds), and the per-example difference ``d_i = arm_i - reference_i`` is what everything below
reads (with the same seeds in both arms this equals the mean over seeds of the per-seed differences).

- the difference: ``mean(d)`` (negative: the arm's held-out NLL is lower, i.e. better);
- its 95% interval: a percentile bootstrap that resamples held-out examples with replacement (``resamples``
  draws, seeded);
- its p-value: a paired sign-flip permutation test (each ``d_i`` flipped in sign at random, ``resamples``
  draws, seeded; two-sided, ``p = (1 + #{|mean(flipped)| >= |mean(d)|}) / (1 + resamples)``);
- the minimum detectable difference at this size: ``2.8 x SE`` with ``SE = sd(d) / sqrt(n)``, the
  difference a two-sided test at alpha 0.05 detects with 80% power (1.96 + 0.84 = 2.8);
- the verdict: ``better`` when the interval lies below 0 and p < 0.05, ``worse`` when it lies above 0 and
  p < 0.05, otherwise ``no detectable difference at this size``.

The interval is conditional on the seeds that were run: it measures how much the result depends on which
held-out examples were drawn, not how much it would move with other training seeds (the report's per-seed
spread shows that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

ALPHA = 0.05
POWER_FACTOR = 2.8  # z_{1 - alpha/2} + z_{power} = 1.96 + 0.84 for alpha 0.05 and 80% power
RESAMPLES = 10_000
BETTER, WORSE, NONE = "better", "worse", "no detectable difference at this size"


@dataclass(frozen=True)
class Paired:
    arm: str
    reference: str
    examples: int  # held-out examples in both arms (NaN values left out)
    difference: float  # mean over examples of (arm - reference); negative is better for an NLL
    low: float  # 95% bootstrap interval
    high: float
    p_value: float  # paired sign-flip permutation test, two-sided
    detectable: float  # minimum detectable difference: 2.8 x the paired standard error
    verdict: str


def per_example_means(rows: Iterable[Mapping[str, object]], *, arm: str, value: str = "answer_nll") -> dict[str, float]:
    """example_id -> the arm's value averaged over its seeds (rows: arm, seed, example_id and the value)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        number = row.get(value)
        if row["arm"] != arm or number is None or (isinstance(number, float) and math.isnan(number)):
            continue
        sums.setdefault(str(row["example_id"]), []).append(float(number))
    return {example: sum(values) / len(values) for example, values in sums.items()}


def compare(rows: list[Mapping[str, object]], *, arm: str, reference: str, value: str = "answer_nll", lower_is_better: bool = True,
            resamples: int = RESAMPLES, seed: int = 0) -> Paired | None:
    """The paired comparison of two arms over the held-out examples both have (None when they share none)."""
    ours, theirs = per_example_means(rows, arm=arm, value=value), per_example_means(rows, arm=reference, value=value)
    common = sorted(set(ours) & set(theirs))
    if not common:
        return None
    differences = np.array([ours[e] - theirs[e] for e in common], dtype=np.float64)
    return paired(differences, arm=arm, reference=reference, lower_is_better=lower_is_better, resamples=resamples, seed=seed)


def paired(differences: np.ndarray, *, arm: str, reference: str, lower_is_better: bool = True, resamples: int = RESAMPLES,
           seed: int = 0) -> Paired:
    """Interval, p-value, detectable difference and verdict for per-example differences (see the module docstring)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"paired statistics need a non-empty list of per-example differences, got shape {d.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    n, mean = d.size, float(d.mean())
    boot = np.empty(resamples)
    flipped = np.empty(resamples)
    for begin in range(0, resamples, 1000):  # in chunks: memory stays at 1000 x n whatever the held-out size
        count = min(1000, resamples - begin)
        boot[begin : begin + count] = d[rng.integers(0, n, size=(count, n))].mean(axis=1)
        flipped[begin : begin + count] = (d * rng.choice((-1.0, 1.0), size=(count, n))).mean(axis=1)
    low, high = (float(q) for q in np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2]))
    tolerance = 1e-12 * max(1.0, abs(mean))  # float noise in the flipped means must not count as "less extreme"
    p_value = float((1 + np.count_nonzero(np.abs(flipped) >= abs(mean) - tolerance)) / (1 + resamples))
    standard_error = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    gain_low, gain_high = (low, high) if lower_is_better else (-high, -low)  # in "lower is better" terms
    if gain_high < 0 and p_value < ALPHA:
        verdict = BETTER
    elif gain_low > 0 and p_value < ALPHA:
        verdict = WORSE
    else:
        verdict = NONE
    return Paired(arm, reference, n, mean, low, high, p_value, POWER_FACTOR * standard_error, verdict)


def comparisons(rows: list[Mapping[str, object]], arms: list[str], *, references: tuple[str, ...] = ("random", "full"),
                value: str = "answer_nll", lower_is_better: bool = True, seed: int = 0) -> list[Paired]:
    """Every arm against each reference arm that has results (never with itself, and a pair once: random against
    full is full against random with the sign turned)."""
    present = {str(r["arm"]) for r in rows}
    found: list[Paired] = []
    for reference in references:
        if reference not in present:
            continue
        for arm in arms:
            if arm == reference or arm not in present or any(p.arm == reference and p.reference == arm for p in found):
                continue
            result = compare(rows, arm=arm, reference=reference, value=value, lower_is_better=lower_is_better, seed=seed)
            if result is not None:
                found.append(result)
    return found
