"""Paired differences between two evaluations on the same problems: the figure behind every 'beats its control'."""

from __future__ import annotations

import pytest

from raypipe.paired import paired_difference


def verdicts(right: set[int], n: int = 100) -> dict[str, bool]:
    return {f"q{i}": i in right for i in range(n)}


def test_ten_more_right_out_of_a_hundred() -> None:
    """a gets 10 problems right that b misses, the rest alike: +0.10, and the bootstrap interval is the binomial
    one (sd sqrt(0.1 * 0.9 / 100) = 0.03, so about +0.04 to +0.16)."""
    out = paired_difference([(verdicts(set(range(60))), verdicts(set(range(50))))], resamples=20_000)
    assert out["mean"] == pytest.approx(0.10) and out["per_seed"] == [pytest.approx(0.10)]
    assert out["only_a_right"] == [10] and out["only_b_right"] == [0] and out["n_problems"] == 100
    low, high = out["ci95"]
    assert low == pytest.approx(0.10 - 1.96 * 0.03, abs=0.01) and high == pytest.approx(0.10 + 1.96 * 0.03, abs=0.01)


def test_the_same_answers_differ_by_exactly_nothing() -> None:
    same = verdicts({1, 5, 7})
    assert paired_difference([(same, same)])["ci95"] == [0.0, 0.0]


def test_seeds_are_averaged_per_problem() -> None:
    """Seed 1: a +4 problems; seed 2: b +2 problems: mean +0.01 over 100 problems, per-seed +0.04 and -0.02."""
    base = set(range(50))
    out = paired_difference([(verdicts(base | {90, 91, 92, 93}), verdicts(base)),
                             (verdicts(base - {0, 1}), verdicts(base))])
    assert out["mean"] == pytest.approx(0.01)
    assert out["per_seed"] == [pytest.approx(0.04), pytest.approx(-0.02)]
    assert out["only_a_right"] == [4, 0] and out["only_b_right"] == [0, 2]
    assert out["ci95"][0] < 0.01 < out["ci95"][1]


def test_evaluations_on_different_problems_are_refused() -> None:
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([(verdicts(set(), 100), verdicts(set(), 99))])
