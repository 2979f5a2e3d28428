"""The verdict logic (laws/verdict.py) on constructed measurements: each outcome, its interval, its errors."""

from __future__ import annotations

import pytest
from scipy import stats

from minicpm.errors import MiniCPMError
from minicpm.laws.verdict import FAILS, HOLDS, INCONCLUSIVE, at_most, mean_interval, optimum_moves_at_most

COSINE = [3.10, 3.12, 3.08, 3.11, 3.09]


def test_mean_interval_is_the_student_t_interval():
    mean, (low, high) = mean_interval([1.0, 2.0, 3.0], confidence=0.95)
    half = stats.t.ppf(0.975, df=2) * 1.0 / 3 ** 0.5  # sample sd 1, n = 3
    assert mean == 2.0 and (low, high) == pytest.approx((2.0 - half, 2.0 + half))
    assert mean_interval([0.5, 0.5]) == (0.5, (0.5, 0.5))  # every seed agrees: a point


def test_a_clear_improvement_holds():
    wsd = [c - 0.05 + e for c, e in zip(COSINE, [0.002, -0.001, 0.0, 0.001, -0.002])]
    verdict = at_most(wsd, COSINE, margin=0.0, claim="WSD(10%) <= cosine")
    assert verdict.outcome == HOLDS and verdict.interval[1] < 0
    assert verdict.estimate == pytest.approx(-0.05) and verdict.seeds == 5
    assert verdict.line().startswith("WSD(10%) <= cosine: holds (mean -0.05")


def test_a_clear_regression_does_not_hold():
    worse = [c + 0.05 + e for c, e in zip(COSINE, [0.002, -0.001, 0.0, 0.001, -0.002])]
    verdict = at_most(worse, COSINE, margin=0.01)
    assert verdict.outcome == FAILS and verdict.interval[0] > 0.01


def test_noise_that_straddles_the_margin_is_inconclusive():
    noisy = [c + e for c, e in zip(COSINE, [0.03, -0.04, 0.05, -0.03, 0.0])]
    verdict = at_most(noisy, COSINE, margin=0.0)
    low, high = verdict.interval
    assert verdict.outcome == INCONCLUSIVE and low < 0 < high


def test_the_margin_decides_a_small_but_certain_loss():
    slightly_worse = [c + 0.005 for c in COSINE]  # every seed 0.005 worse: a point interval
    assert at_most(slightly_worse, COSINE, margin=0.01).outcome == HOLDS
    assert at_most(slightly_worse, COSINE, margin=0.0).outcome == FAILS


def test_an_optimum_that_stays_put_holds_one_that_moves_does_not():
    narrow = [0.01, 0.01, 0.02, 0.01]
    assert optimum_moves_at_most(narrow, [0.01, 0.02, 0.02, 0.01], doublings=1).outcome == HOLDS
    moved = optimum_moves_at_most(narrow, [0.08, 0.16, 0.16, 0.08], doublings=1)
    assert moved.outcome == FAILS and moved.interval[0] > 1
    drifted = optimum_moves_at_most(narrow, [0.01, 0.04, 0.02, 0.08], doublings=1)
    assert drifted.outcome == INCONCLUSIVE and drifted.interval[0] < 1 < drifted.interval[1]


@pytest.mark.parametrize("call, message", [
    (lambda: at_most([1.0], [1.0]), "at least 2"),
    (lambda: at_most([1.0, 2.0], [1.0]), "as many seeds on each side, got 2 and 1"),
    (lambda: at_most([1.0, float("nan")], [1.0, 1.0]), "finite"),
    (lambda: optimum_moves_at_most([0.01, 0.0], [0.01, 0.02], doublings=1), "optima must be positive"),
    (lambda: mean_interval([1.0, 2.0], confidence=1.5), "confidence must lie in"),
])
def test_bad_measurements_are_one_line_errors(call, message):
    with pytest.raises(MiniCPMError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
