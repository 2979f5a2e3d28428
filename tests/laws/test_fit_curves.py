"""Loss-curve laws (minicpm/experiments/curve_laws.py) and the schedule readers they use (fit_data.py): the laws
against direct loops over their formulas, analytic Jacobians, and prediction of a held-out WSD curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from minicpm.errors import MiniCPMError
from minicpm.laws import curves as curve_laws
from minicpm.laws.curves import (LAWS, _terms, _theta, fit_curve_law, load_fit_params, predict_loss,
                                            prediction_steps)
from minicpm.laws.tables import Curve, load_curve, load_schedule, lr_per_step
from minicpm.optim.schedule import constant_schedule, cosine_schedule, wsd_schedule

TRUTH = {"tissue": {"L0": 3.0, "A": 1.0, "alpha": 0.5, "C": 0.08, "lambda": 0.995},
         "mpl": {"L0": 3.0, "A": 1.0, "alpha": 0.5, "B": 30.0, "C": 2.0, "beta": 0.55, "gamma": 0.55}}


def lr_of(schedule, total, peak=1e-2, **kw):
    """The LR at steps 0..total of one of the trainer's schedules (minicpm/optim/schedule.py)."""
    return peak * np.array([schedule(step, **kw) for step in range(total + 1)])


def odd_schedule():
    """Warmup, a plateau, a decay, a re-warm and a second decay: every case the sums must handle."""
    lr = np.concatenate([np.linspace(0, 1e-2, 6), np.full(10, 1e-2), np.linspace(1e-2, 2e-3, 15),
                         np.linspace(2e-3, 6e-3, 5), np.linspace(6e-3, 1e-3, 12)])
    return lr


def tissue_by_loops(p, lr, t):
    w = int(np.argmax(lr))
    s1 = sum(lr[1:t + 1])
    m, s2 = 0.0, 0.0
    for i in range(1, t + 1):
        m = p["lambda"] * m + (lr[i - 1] - lr[i]) if i > w else 0.0
        s2 += m
    return p["L0"] + p["A"] * s1 ** -p["alpha"] - p["C"] * s2


def mpl_by_loops(p, lr, t):
    """Luo et al.'s sum: every LR change from k = 1 (warmup rises included), S1 the whole area from step 1."""
    total = sum(lr[1:t + 1])
    ld = 0.0
    for k in range(1, t + 1):
        s_k = sum(lr[k:t + 1])
        g = 1 - (p["C"] * lr[k] ** -p["gamma"] * s_k + 1) ** -p["beta"]
        ld += (lr[k - 1] - lr[k]) * g
    return p["L0"] + p["A"] * total ** -p["alpha"] - p["B"] * ld


@pytest.mark.parametrize("law, reference", [("tissue", tissue_by_loops), ("mpl", mpl_by_loops)])
def test_law_matches_a_direct_loop_over_its_formula(law, reference):
    lr = odd_schedule()
    steps = np.arange(1, len(lr))
    expected = [reference(TRUTH[law], lr, t) for t in steps]
    np.testing.assert_allclose(predict_loss(law, TRUTH[law], lr, steps), expected, rtol=1e-12)


def test_multi_power_blocks_used_while_fitting_stay_close_to_the_exact_sum():
    lr = lr_of(cosine_schedule, 12000, warmup_steps=100, period=12000)
    steps = np.array([101, 500, 3000, 6000, 9000, 11990, 12000])  # fits use the points after warmup
    theta = _theta("mpl", TRUTH["mpl"])
    blocked = _terms("mpl", lr, steps, max_blocks=curve_laws.FIT_BLOCKS).predict(theta)
    exact = predict_loss("mpl", TRUTH["mpl"], lr, steps)
    np.testing.assert_allclose(blocked, exact, rtol=1e-4)
    assert len(_terms("mpl", lr, steps, max_blocks=curve_laws.FIT_BLOCKS).dk) <= 1.1 * curve_laws.FIT_BLOCKS


@pytest.mark.parametrize("law", LAWS)
def test_analytic_jacobian_matches_finite_differences(law):
    lr = odd_schedule()
    terms = _terms(law, lr, np.arange(7, len(lr)))
    theta = _theta(law, TRUTH[law])
    _, jac = terms.predict(theta, jac=True)
    for i in range(len(theta)):
        h = np.zeros_like(theta)
        h[i] = 1e-6
        numeric = (terms.predict(theta + h) - terms.predict(theta - h)) / 2e-6
        np.testing.assert_allclose(jac[:, i], numeric, rtol=1e-5, atol=1e-9, err_msg=LAWS[law][i])


@pytest.mark.parametrize("law", LAWS)
def test_law_fitted_on_constant_and_cosine_curves_predicts_a_held_out_wsd_curve(law):
    total, warmup, peak = 1000, 25, 1e-2
    steps = np.arange(total + 1)
    logged = np.arange(5, total + 1, 5)
    rng = np.random.default_rng(0)

    def synthetic(name, lr):  # eval-like noise: 0.03% relative
        loss = predict_loss(law, TRUTH[law], lr, logged) * (1 + rng.normal(0, 3e-4, len(logged)))
        return Curve(name, steps[::5], lr[::5], logged, loss)

    constant = lr_of(constant_schedule, total, peak, warmup_steps=warmup)
    cosine = lr_of(cosine_schedule, total, peak, warmup_steps=warmup, period=total)
    fit = fit_curve_law(law, [synthetic("constant", constant), synthetic("cosine", cosine)], method="optimum")
    assert max(c.rmse_rel for c in fit.curves) < 1e-3
    # WSD with a 20% decay to 10% of the peak (paper §6.2 ends its decay near lr/10)
    for decay, extra in (("linear", {"floor": 0.1}), ("exp", {"half_life": 200 / 3.32})):
        wsd = lr_of(wsd_schedule, total, peak, warmup_steps=warmup, decay_start=800, decay_steps=200, decay=decay,
                    **extra)
        predicted = predict_loss(law, fit.params, wsd, logged)
        truth = predict_loss(law, TRUTH[law], wsd, logged)
        assert np.abs(predicted / truth - 1).max() < 0.005, decay
        assert truth[-1] < truth[logged == 800][0] - 0.05  # the decay really drops the loss


def test_curves_with_no_decay_cannot_fit_the_annealing_terms():
    steps = np.arange(0, 501, 10)
    lr = np.full(len(steps), 1e-2)
    curve = Curve("constant", steps, lr, steps[1:], 3 + steps[1:] ** -0.5)
    with pytest.raises(MiniCPMError, match="no curve's LR decreases after warmup"):
        fit_curve_law("mpl", [curve])
    with pytest.raises(MiniCPMError, match="loss points after warmup"):
        fit_curve_law("tissue", [Curve("short", steps, lr, steps[1:4], np.array([4.0, 3.9, 3.8]))])
    with pytest.raises(MiniCPMError, match="unknown loss-curve law"):
        fit_curve_law("kaplan", [curve])


# ------------------------------------------------------------------------------------------- schedules

def test_lr_is_linear_between_rows_and_rises_from_zero_before_the_first():
    lr = lr_per_step(np.array([10, 20, 40]), np.array([1.0, 0.5, 0.5]), 45)
    assert lr[0] == 0 and lr[5] == pytest.approx(0.5) and lr[10] == 1.0
    assert lr[15] == pytest.approx(0.75) and lr[30] == 0.5 and lr[45] == 0.5
    assert lr_per_step(np.array([0, 10]), np.array([0.3, 0.1]), 10)[0] == 0.3


def logged(lr: np.ndarray) -> np.ndarray:
    """The trainer logs at step s the LR of its s-th update, schedule(s − 1); step 0 (no update yet) is LR 0."""
    return np.concatenate([[0.0], lr[:-1]])


def test_schedule_yaml_gives_the_lr_the_trainer_logs_at_every_step(tmp_path):
    (tmp_path / "wsd.yaml").write_text(yaml.safe_dump({
        "lr": 0.01, "warmup_steps": 10, "total_steps": 100, "decay_steps": 20, "decay": "exp", "half_life": 5}))
    lr = load_schedule(tmp_path / "wsd.yaml")
    expected = lr_of(wsd_schedule, 100, 0.01, warmup_steps=10, decay_start=80, decay_steps=20, decay="exp", half_life=5)
    np.testing.assert_array_equal(lr, logged(expected))
    # a run's config.yaml works too: optim.lr and its schedule section
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "optim": {"lr": 0.02},
        "schedule": {"kind": "cosine", "total_steps": 50, "warmup_steps": 5}}))
    np.testing.assert_array_equal(load_schedule(tmp_path / "config.yaml"),
                                  logged(lr_of(cosine_schedule, 50, 0.02, warmup_steps=5, period=50)))


def test_schedule_csv_uses_the_interpolation_convention(tmp_path):
    (tmp_path / "s.csv").write_text("step,lr\n10,0.01\n100,0.001\n")
    lr = load_schedule(tmp_path / "s.csv")
    assert len(lr) == 101 and lr[0] == 0 and lr[5] == pytest.approx(0.005) and lr[100] == 0.001


@pytest.mark.parametrize("cfg, message", [
    ({"lr": 0.01, "total_steps": 50, "warmup": 3}, "unknown schedule key 'warmup'"),
    ({"total_steps": 50}, "lr \\(or optim.lr\\) must be a positive number"),
    ({"lr": 0.01, "total_steps": "50"}, "'total_steps' must be an integer"),
    ({"lr": 0.01, "total_steps": 50, "floor": 1.5}, "schedule.floor must be in"),
])
def test_bad_schedule_yaml_is_a_clear_error(tmp_path, cfg, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(MiniCPMError, match=message):
        load_schedule(tmp_path / "bad.yaml")


def test_curve_from_metrics_jsonl_puts_eval_losses_on_the_training_lines_schedule(tmp_path):
    lines = [{"step": 10, "tokens": 100, "lr": 0.01, "loss": 5.0}, {"step": 20, "tokens": 200, "lr": 0.01, "loss": 4.0},
             {"step": 20, "eval_loss": 4.2}, {"step": 30, "lr": 0.005, "loss": float("nan")},
             {"step": 30, "eval_loss": 3.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = load_curve(tmp_path, loss_key="eval_loss")
    assert list(curve.loss_steps) == [20, 30] and list(curve.loss) == [4.2, 3.9]
    assert list(curve.lr_steps) == [10, 20, 30]
    train = load_curve(tmp_path / "metrics.jsonl")
    assert list(train.loss_steps) == [10, 20]  # the NaN (skipped) step is not a point


def test_fit_json_is_checked_before_predicting():
    law, params = load_fit_params({"law": "tissue", "params": TRUTH["tissue"]}, "fit.json")
    assert law == "tissue" and params == TRUTH["tissue"]
    with pytest.raises(MiniCPMError, match="params.C must be a finite number"):
        load_fit_params({"law": "tissue", "params": {**TRUTH["tissue"], "C": None}}, "fit.json")
    with pytest.raises(MiniCPMError, match="missing 'law'"):
        load_fit_params({"params": {}}, "fit.json")
    assert list(prediction_steps(2500)) == list(range(3, 2500, 3)) + [2500]
