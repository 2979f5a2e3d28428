"""The forms of L(N, D) that `scaling fit --law` offers (laws/variants.py) and the held-out checks that choose
between them (laws/extrapolation.py): Gadre et al.'s shared exponent, the compute-weighted fit with E bounded, the
largest size held out and the leave-one-size-out table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minicpm.errors import MiniCPMError
from minicpm.laws.chinchilla import PARAMS, ScalingLaw, _huber, _log_model, _objective, bootstrap_chinchilla, \
    fit_chinchilla, fit_law
from minicpm.laws.extrapolation import holdout_largest, leave_one_size_out
from minicpm.laws.tables import RunTable
from minicpm.laws.variants import DEFAULT_LAW, VARIANTS

SHARED = ScalingLaw(E=1.74, A=134.6, B=231.3, alpha=0.26, beta=0.26)
"""One exponent for N and D (Gadre et al. 2024's form), constants of their RedPajama runs' scale."""


def campaign(law: ScalingLaw, noise: float, seed: int = 0, sizes: int = 6) -> RunTable:
    """sizes x 6 decay points (10N..60N), log-normal noise."""
    n = np.repeat(np.geomspace(4e7, 2e9, sizes), 6)
    d = n * np.tile([10, 20, 30, 40, 50, 60], sizes)
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, len(n)))
    return RunTable(n, d, loss, [f"r{i}" for i in range(len(n))], source="synthetic")


def test_shared_exponent_law_recovers_a_one_exponent_law_exactly_and_inside_its_intervals():
    exact = campaign(SHARED, noise=0.0)
    fit = fit_chinchilla(exact.params, exact.tokens, exact.loss, variant="shared")
    assert fit.variant == "shared" and fit.law.alpha == fit.law.beta
    for p in PARAMS:
        assert getattr(fit.law, p) == pytest.approx(getattr(SHARED, p), rel=1e-3), p
    covered = {p: 0 for p in PARAMS}
    for seed in range(1, 6):
        noisy = campaign(SHARED, noise=0.004, seed=seed)
        fit = fit_chinchilla(noisy.params, noisy.tokens, noisy.loss, variant="shared")
        intervals = bootstrap_chinchilla(noisy, fit, n_boot=60, confidence=0.95, seed=0).intervals()
        assert intervals["alpha"] == intervals["beta"]  # the bootstrap refits the same form
        for p in PARAMS:
            covered[p] += intervals[p][0] <= getattr(SHARED, p) <= intervals[p][1]
    assert min(covered.values()) >= 4, covered  # 95% intervals: at most one miss in five tables


def test_weighted_fit_minimises_the_compute_weighted_huber_objective_with_e_below_the_lowest_loss():
    table = campaign(ScalingLaw(E=1.2, A=60.0, B=90.0, alpha=0.29, beta=0.23), noise=0.01, seed=2)
    fit = fit_chinchilla(table.params, table.tokens, table.loss, variant="weighted")
    assert fit.law.E <= table.loss.min()
    compute = table.params * table.tokens
    weights = compute / compute.mean()
    x, y = np.log(table.params) - fit.centre[0], np.log(table.tokens) - fit.centre[1]
    residual = _log_model(fit.theta, x, y)[0] - np.log(table.loss)
    assert fit.objective == pytest.approx(float(np.mean(weights * _huber(residual, 1e-3)) / 1e-3), rel=1e-9)
    # the optimum: the weighted gradient vanishes in every free coordinate (E is not on its bound here)
    value, grad = _objective(fit.theta, x, y, np.log(table.loss), 1e-3, weights)
    assert value == pytest.approx(fit.objective) and np.abs(grad).max() < 1e-5


def test_shared_law_fitted_without_the_largest_size_predicts_it_inside_its_band():
    table = campaign(SHARED, noise=0.003, seed=3)
    row = holdout_largest(table, "shared", n_boot=40)
    assert row.held_n == table.params.max() and row.rows == 6 and row.ratio == pytest.approx(2e9 / 9.1e8, rel=0.01)
    assert row.mean_abs_rel_err < 0.005 and row.coverage >= 5 / 6


def test_leave_one_size_out_gives_a_row_per_size_and_law():
    table = campaign(SHARED, noise=0.003, seed=4, sizes=4)
    rows = leave_one_size_out(table, ("chinchilla", "shared"), n_boot=20)
    assert [(r.law, r.held_n) for r in rows] == [(law, n) for law in ("chinchilla", "shared")
                                                 for n in np.unique(table.params)]
    assert all(r.skipped or r.mean_abs_rel_err < 0.05 for r in rows)
    with pytest.raises(MiniCPMError, match="leaving one out needs at least 4"):
        leave_one_size_out(campaign(SHARED, 0.003, sizes=3))


def test_least_squares_fits_only_the_papers_law():
    table = campaign(SHARED, noise=0.0)
    with pytest.raises(MiniCPMError, match="--law 'shared': the least-squares fit"):
        fit_law("lsq", table.params, table.tokens, table.loss, variant="shared")
    with pytest.raises(MiniCPMError, match="--law 'free'"):
        fit_law("huber", table.params, table.tokens, table.loss, variant="free")
    assert DEFAULT_LAW in VARIANTS


def test_scaling_fit_law_holdout_and_leave_one_size_out_from_the_command_line(tmp_path, cli):
    table = campaign(SHARED, noise=0.003, seed=5, sizes=4)
    rows = ["run,params,tokens,loss"] + [f"{r},{n:.0f},{d:.0f},{l:.6f}" for r, n, d, l in
                                         zip(table.run, table.params, table.tokens, table.loss)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    r = cli("scaling", "fit", tmp_path / "t.csv", "--json", "--bootstrap", "20", "--holdout", "largest",
            "--leave-one-size-out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["fit"]["variant"] == DEFAULT_LAW and doc["holdout"]["held_n"] == table.params.max()
    assert len(doc["leave_one_size_out"]) == 4 * len(VARIANTS)
    r = cli("scaling", "fit", tmp_path / "t.csv", "--bootstrap", "20", "--law", "chinchilla", "--holdout", "largest",
            cwd=tmp_path)
    assert r.returncode == 0 and "Held out: the largest size" in r.stdout and "law chinchilla" in r.stdout
