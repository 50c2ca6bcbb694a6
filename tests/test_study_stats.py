"""The study's paired statistics on constructed cases whose answers are known in advance."""

from __future__ import annotations

import numpy as np
import pytest

from curate.experiments.study.stats import BETTER, NONE, WORSE, compare, comparisons, paired


def rows_for(arm: str, values: dict[int, np.ndarray]) -> list[dict]:
    """Per-example rows of one arm: seed -> NLL per held-out example (ids e0, e1, ...)."""
    return [{"arm": arm, "seed": seed, "example_id": f"e{i}", "answer_nll": float(v)}
            for seed, array in values.items() for i, v in enumerate(array)]


def noisy_reference(n: int = 60, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.normal(1.2, 0.4, size=n)  # examples differ a lot in difficulty: what pairing removes
    return {s: base + rng.normal(0, 0.02, size=n) for s in seeds}


def test_an_arm_better_on_every_example_by_a_fixed_amount_is_better_with_a_tight_interval_around_it() -> None:
    reference = noisy_reference()
    arm = {s: v - 0.05 for s, v in reference.items()}
    result = compare(rows_for("random", reference) + rows_for("good", arm), arm="good", reference="random")
    assert result is not None and result.examples == 60
    assert result.difference == pytest.approx(-0.05, abs=1e-9)
    assert result.low == pytest.approx(-0.05, abs=1e-9) and result.high == pytest.approx(-0.05, abs=1e-9)
    assert result.p_value < 1e-3  # every flip but the observed signs gives a smaller |mean|
    assert result.detectable == pytest.approx(0.0, abs=1e-9)  # no spread in the differences
    assert result.verdict == BETTER


def test_two_identical_arms_show_no_detectable_difference() -> None:
    reference = noisy_reference()
    result = compare(rows_for("random", reference) + rows_for("same", reference), arm="same", reference="random")
    assert result.difference == 0.0 and result.low <= 0.0 <= result.high
    assert result.p_value == 1.0 and result.verdict == NONE


def test_a_worse_arm_is_worse_and_noise_alone_is_not_a_difference() -> None:
    rng = np.random.default_rng(3)
    reference = noisy_reference()
    worse = {s: v + 0.04 + rng.normal(0, 0.03, size=v.size) for s, v in reference.items()}
    result = compare(rows_for("random", reference) + rows_for("bad", worse), arm="bad", reference="random")
    assert result.verdict == WORSE and 0 < result.low < 0.04 < result.high and result.p_value < 0.01
    # pure noise around zero: the interval covers 0 and the verdict says so; the detectable difference is the
    # paired standard error times 2.8
    noise = rng.normal(0, 0.05, size=40)
    flat = paired(noise - noise.mean(), arm="noise", reference="random")
    assert flat.low < 0 < flat.high and flat.verdict == NONE
    assert flat.detectable == pytest.approx(2.8 * noise.std(ddof=1) / np.sqrt(40))


def test_seeds_are_averaged_per_example_and_the_statistics_are_seeded() -> None:
    reference = noisy_reference(n=30)
    arm = {0: reference[0] - 0.1, 1: reference[1] + 0.1, 2: reference[2] - 0.03}  # seeds cancel to -0.01 per example
    rows = rows_for("random", reference) + rows_for("mixed", arm)
    first, again = (compare(rows, arm="mixed", reference="random", seed=5) for _ in range(2))
    assert first == again and first.difference == pytest.approx(-0.01, abs=1e-9)
    assert first.verdict == BETTER  # the same -0.01 on every example


def test_accuracy_is_compared_with_higher_is_better() -> None:
    reference = {0: np.zeros(50)}
    arm = {0: np.ones(50)}
    rows = [dict(r, correct=r.pop("answer_nll")) for r in rows_for("random", reference) + rows_for("smart", arm)]
    result = compare(rows, arm="smart", reference="random", value="correct", lower_is_better=False)
    assert result.difference == 1.0 and result.verdict == BETTER


def test_every_arm_is_compared_with_random_and_full_but_not_with_itself() -> None:
    reference = noisy_reference(n=20)
    rows = rows_for("random", reference) + rows_for("full", {0: reference[0] - 0.2}) + rows_for("a", reference)
    pairs = {(p.arm, p.reference) for p in comparisons(rows, ["full", "random", "a", "missing"])}
    assert pairs == {("full", "random"), ("a", "random"), ("a", "full")}  # random vs full is full vs random
    with pytest.raises(ValueError, match="non-empty"):
        paired(np.array([]), arm="a", reference="random")
