"""The multi-power law is Luo et al.'s law as they published and fitted it (issue 24): predict_loss with their
published 25M parameters on their schedule equals their formula, computed here independently in a few lines; both
fit methods (the objective's optimum, and their early-stopped AdamW) recover it from curves it generates on their
schedules. (On their logged curves, benchmarks/multi_power_published.py --data measures both.)"""

from __future__ import annotations

import numpy as np
import pytest

from minicpm.errors import MiniCPMError
from minicpm.laws.curves import fit_curve_law, predict_loss
from minicpm.laws.tables import Curve

# Luo et al. (2025), thu-yao-01-luo/MultiPowerLaw README "Best Parameters", 25M model
PUBLISHED_25M = {"L0": 3.04045406, "A": 0.52468604, "alpha": 0.50786857, "B": 363.78751622, "C": 2.06560812,
                 "beta": 0.58279013, "gamma": 0.64142257}
PEAK, WARMUP, TOTAL, FLOOR = 3e-4, 2160, 24000, 3e-5


def their_cosine_schedule() -> np.ndarray:
    """Linear warmup 0 -> 3e-4 over 2160 steps, then cosine to 3e-5 at step 24000: eta_t for t = 0..24000."""
    t = np.arange(TOTAL + 1, dtype=float)
    progress = (t - WARMUP) / (TOTAL - WARMUP)
    cosine = FLOOR + (PEAK - FLOOR) * 0.5 * (1 + np.cos(np.pi * progress))
    return np.where(t < WARMUP, PEAK * t / WARMUP, cosine)


def their_formula(p: dict, eta: np.ndarray, t: int) -> float:
    """L0 + A·S1(t)^-alpha + B·Σ_{k=1..t} (eta_k − eta_{k−1})·(1 − (1 + C·eta_k^-gamma·S_k(t))^-beta)."""
    s1 = eta[1:t + 1].sum()
    s_k = np.cumsum(eta[1:t + 1][::-1])[::-1]  # S_k(t) = Σ_{tau=k..t} eta_tau for k = 1..t
    rises = eta[1:t + 1] - eta[:t]
    drop = np.sum(rises * (1 - (1 + p["C"] * eta[1:t + 1] ** -p["gamma"] * s_k) ** -p["beta"]))
    return p["L0"] + p["A"] * s1 ** -p["alpha"] + p["B"] * drop


def test_multi_power_law_equals_luo_et_al_formula_with_their_published_parameters():
    eta = their_cosine_schedule()
    steps = np.array([1, 100, WARMUP - 1, WARMUP, WARMUP + 1, 5000, 12000, 20000, 23999, TOTAL])
    expected = np.array([their_formula(PUBLISHED_25M, eta, t) for t in steps])
    np.testing.assert_allclose(predict_loss("mpl", PUBLISHED_25M, eta, steps), expected, rtol=1e-9)
    # the warmup's rises are in the sum (a sum from the end of warmup ends this run 0.108 nats lower, at 3.207)
    assert expected[-1] > 3.3


def their_schedule(stable_until: int, total: int, tail) -> np.ndarray:
    """Their data loader's schedules: linspace warmup 0 -> 3e-4 over 2160 steps, 3e-4 to `stable_until`, then tail."""
    t = np.arange(stable_until, total)
    return np.concatenate([np.linspace(0, PEAK, WARMUP), np.full(stable_until - WARMUP, PEAK), tail(t)])


THEIR_TRAIN = {"cosine": their_cosine_schedule()[:TOTAL],
               "constant": their_schedule(TOTAL, TOTAL, lambda t: np.empty(0)),
               "two-step 9e-5": their_schedule(8000, 16000, lambda t: np.full(len(t), 9e-5))}
THEIR_TEST = {"wsd linear": their_schedule(20000, TOTAL, lambda t: PEAK + (FLOOR - PEAK) * (t - 20000) / 4000),
              "two-step 1.8e-4": their_schedule(8000, 16000, lambda t: np.full(len(t), 1.8e-4))}


@pytest.mark.parametrize("method, bound", [("optimum", 1e-5), ("luo", 1e-3)])
def test_both_fit_methods_predict_held_out_schedules_from_curves_of_the_published_law(method, bound):
    curves = []
    for name, lr in THEIR_TRAIN.items():
        steps = np.arange(WARMUP + 16, len(lr), 128)
        curves.append(Curve(name, np.arange(len(lr)), lr, steps, predict_loss("mpl", PUBLISHED_25M, lr, steps)))
    fit = fit_curve_law("mpl", curves, max_points=1000, method=method)
    assert fit.method == method and fit.to_json()["method"] == method
    for name, lr in THEIR_TEST.items():
        steps = np.arange(WARMUP + 16, len(lr), 128)
        truth = predict_loss("mpl", PUBLISHED_25M, lr, steps)
        error = np.abs(predict_loss("mpl", fit.params, lr, steps) / truth - 1).mean()
        assert error < bound, f"{name}: {error:.4%}"


def test_luo_method_fits_only_the_multi_power_law():
    lr = THEIR_TRAIN["cosine"]
    steps = np.arange(WARMUP + 16, len(lr), 128)
    curve = Curve("cosine", np.arange(len(lr)), lr, steps, predict_loss("mpl", PUBLISHED_25M, lr, steps))
    with pytest.raises(MiniCPMError, match="method 'luo' fits the multi-power law"):
        fit_curve_law("tissue", [curve], method="luo")
    with pytest.raises(MiniCPMError, match="unknown loss-curve fit method"):
        fit_curve_law("mpl", [curve], method="adam")
