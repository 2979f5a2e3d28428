"""Scaling-law fits (minicpm/experiments/fit.py): recovery of known laws, interval calibration, the compute-optimal
formulas, isoFLOP / envelope / batch-size fits, and the errors a user sees for bad tables and run directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from minicpm.errors import MiniCPMError
from minicpm.laws.chinchilla import (PARAMS, ScalingLaw, bootstrap_chinchilla, fit_batch_size_law, fit_chinchilla,
                                     fit_envelope, fit_isoflop, held_out_checks, resample_groups,
                                     run_groups)
from minicpm.laws.tables import RunTable, load_runs, load_table
from minicpm.laws.report import analyse_table, dumps, report_json
from minicpm.model.config import preset

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic_table(law: ScalingLaw, seed: int, noise: float = 0.01) -> RunTable:
    """5 sizes x 6 token counts (10N..320N), log-normal noise on the loss: a WSD campaign's table."""
    n = np.repeat(np.geomspace(1e7, 1e9, 5), 6)
    d = n * np.tile([10, 20, 40, 80, 160, 320], 5)
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, len(n)))
    return RunTable(n, d, loss, [f"r{i}" for i in range(len(n))], source="synthetic")


def test_fit_recovers_known_parameters_inside_its_bootstrap_intervals():
    table = synthetic_table(CHINCHILLA, seed=1)
    fit = fit_chinchilla(table.params, table.tokens, table.loss)
    boot = bootstrap_chinchilla(table, fit, n_boot=100, confidence=0.95, seed=1)
    intervals = boot.intervals()
    for p in PARAMS:
        lo, hi = intervals[p]
        assert lo <= getattr(CHINCHILLA, p) <= hi, (p, lo, hi)
        assert lo <= getattr(fit.law, p) <= hi
    assert fit.law.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.05)
    assert fit.law.beta == pytest.approx(CHINCHILLA.beta, abs=0.05)
    assert fit.law.E == pytest.approx(CHINCHILLA.E, rel=0.05)


def test_noise_free_data_are_fitted_exactly():
    table = synthetic_table(CHINCHILLA, seed=0, noise=0.0)
    law = fit_chinchilla(table.params, table.tokens, table.loss).law
    for p in PARAMS:
        assert getattr(law, p) == pytest.approx(getattr(CHINCHILLA, p), rel=1e-3), p


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth_about_as_often_as_nominal():
    nominal, seeds = 0.8, 40
    hits = []
    for seed in range(seeds):
        table = synthetic_table(CHINCHILLA, seed=1000 + seed)
        fit = fit_chinchilla(table.params, table.tokens, table.loss, n_starts=4)
        intervals = bootstrap_chinchilla(table, fit, n_boot=40, confidence=nominal, seed=seed).intervals()
        hits.append([intervals[p][0] <= getattr(CHINCHILLA, p) <= intervals[p][1] for p in PARAMS])
    coverage = np.array(hits).mean(axis=0)
    # binomial sd of one parameter's rate over 40 seeds is 0.063; the pooled rate (5 correlated intervals) is tighter
    assert 0.70 <= coverage.mean() <= 0.93, coverage
    assert coverage.min() >= 0.6 and coverage.max() <= 0.98, coverage


@pytest.mark.parametrize("law", [CHINCHILLA, ScalingLaw(E=1.2, A=30.0, B=80.0, alpha=0.29, beta=0.23)])
def test_compute_optimal_formulas_match_brute_force_minimisation(law):
    for flops in (1e18, 1e21, 1e24):
        n = np.geomspace(1e3, 1e16, 400_001)
        loss = law.loss(n, flops / (6 * n))
        best = n[np.argmin(loss)]
        assert law.n_opt(flops) == pytest.approx(best, rel=1e-4)
        assert law.d_opt(flops) == pytest.approx(flops / (6 * best), rel=1e-4)
        ratio = law.K ** 2 * (flops / 6) ** law.eta  # DESIGN §3: N_opt/D_opt = K²·(C/6)^eta
        assert law.n_opt(flops) / law.d_opt(flops) == pytest.approx(ratio, rel=1e-9)


def test_isoflop_profiles_find_the_compute_optimal_size():
    budgets = [1e18, 1e19, 1e20]
    n, d = [], []
    for c in budgets:
        for m in np.geomspace(0.1, 10, 9):
            n.append(CHINCHILLA.n_opt(c) * m)
            d.append(c / (6 * n[-1]))
    n, d = np.array(n), np.array(d)
    table = RunTable(n, d, CHINCHILLA.loss(n, d), [str(i) for i in range(len(n))])
    iso = fit_isoflop(table)
    assert [p.flops for p in iso.profiles] == pytest.approx(budgets)
    for p in iso.profiles:
        assert p.n_opt == pytest.approx(CHINCHILLA.n_opt(p.flops), rel=0.15)
    exponent = CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta)
    assert iso.a == pytest.approx(exponent, abs=0.02)
    assert iso.a + iso.b == pytest.approx(1.0, abs=1e-9)


def test_envelope_fit_recovers_a_power_law_in_compute():
    c = np.geomspace(1e17, 1e21, 12)
    loss = (30.0 * c ** -0.08 + 1.8) * np.exp(np.random.default_rng(0).normal(0, 0.002, len(c)))
    n = np.full(len(c), 1e8)
    table = RunTable(n, c / (6 * n), loss, [str(i) for i in range(len(c))])
    env = fit_envelope(table)
    assert env.a == pytest.approx(0.08, rel=0.2)
    assert env.L0 == pytest.approx(1.8, rel=0.1)
    assert np.abs(env.loss(c) / loss - 1).max() < 0.01


def test_batch_size_law_recovers_the_paper_constants():
    loss = np.linspace(2.2, 3.8, 30)
    bs = 1.21e9 / loss ** 6.24 * np.exp(np.random.default_rng(0).normal(0, 0.05, len(loss)))
    fit = fit_batch_size_law(loss, bs, n_boot=200, confidence=0.95)
    iv = fit.intervals()
    assert iv["b"][0] <= 6.24 <= iv["b"][1] and iv["b"][1] - iv["b"][0] < 0.5
    assert iv["a"][0] <= 1.21e9 <= iv["a"][1]
    assert fit.law.batch_tokens(2.5) == pytest.approx(1.21e9 / 2.5 ** 6.24, rel=0.05)


def test_held_out_largest_size_and_longest_runs_are_predicted_well_from_clean_data():
    table = synthetic_table(CHINCHILLA, seed=2, noise=0.002)
    largest, longest = held_out_checks(table, 1e-3)
    assert largest.n_held == 6 and longest.n_held == 5
    assert largest.max_abs_rel_err < 0.02 and longest.max_abs_rel_err < 0.02


def test_bootstrap_resamples_whole_runs():
    runs = ["a", "a", "a", "b", "c", "c"]
    idx = resample_groups(run_groups(runs), np.random.default_rng(0))
    picked = [runs[i] for i in idx]
    for r in set(picked):  # a drawn run comes with all of its rows, as often as it was drawn
        assert picked.count(r) % runs.count(r) == 0


def test_report_json_has_params_and_intervals_and_no_nan():
    report = analyse_table(synthetic_table(CHINCHILLA, seed=3), n_boot=20, budgets=[1e21], predictions=[(1e9, 2e10)])
    doc = json.loads(dumps(report_json(report)))
    assert set(doc["params"]) == set(PARAMS) and set(doc["intervals"]) == set(PARAMS)
    assert all(lo <= doc["params"][p] <= hi for p, (lo, hi) in doc["intervals"].items())
    plan = doc["compute_optimal"]["budgets"][0]
    assert plan["tokens_per_param"] == pytest.approx(plan["d_opt"] / plan["n_opt"])
    assert "NaN" not in dumps(report_json(report))


def test_a_nan_is_never_printed():
    with pytest.raises(MiniCPMError, match="non-finite"):
        dumps({"params": {"E": float("nan")}})


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("text, message", [
    ("params,loss\n1e8,3.0\n", "missing column 'tokens'"),
    ("params,tokens,loss\n1e8,1e9,-3\n", "must be a positive finite number"),
    ("params,tokens,loss\n1e8,1e9,abc\n", "not a number"),
    ("params,tokens,loss\n1e8,,3.0\n", "column 'tokens' is empty"),
])
def test_bad_tables_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(MiniCPMError, match=message):
        load_table(path)


def test_too_few_points_or_sizes_are_clear_errors():
    t = synthetic_table(CHINCHILLA, seed=0)
    with pytest.raises(MiniCPMError, match="at least 6 runs"):
        fit_chinchilla(t.params[:5], t.tokens[:5], t.loss[:5])
    two_sizes = t.params < 1e8
    with pytest.raises(MiniCPMError, match="3 distinct model sizes"):
        fit_chinchilla(t.params[two_sizes], t.tokens[two_sizes], t.loss[two_sizes])


def test_data_that_do_not_determine_the_law_are_reported_as_not_converged():
    t = synthetic_table(CHINCHILLA, seed=0, noise=0.0)
    flat_in_d = 2 + 400 * t.params ** -0.34  # the loss does not depend on D: beta is undetermined
    with pytest.raises(MiniCPMError, match="did not converge"):
        fit_chinchilla(t.params, t.tokens, flat_in_d)


# ------------------------------------------------------------------------------------------- inputs

def test_jsonl_table_and_run_groups(tmp_path):
    t = synthetic_table(CHINCHILLA, seed=0)
    lines = [json.dumps({"params": n, "tokens": d, "loss": l, "run": f"size{n:.0e}"})
             for n, d, l in zip(t.params, t.tokens, t.loss)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    table = load_table(tmp_path / "t.jsonl")
    assert len(table) == 30 and len(set(table.run)) == 5
    assert table.flops is None
    np.testing.assert_allclose(table.compute(), 6 * t.params * t.tokens)


def _run_dir(root, name, model, tokens, eval_loss):
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"model": model, "optim": {"lr": 0.01}}))
    lines = [{"step": 10, "tokens": tokens // 2, "lr": 0.01, "loss": eval_loss + 0.5},
             {"step": 20, "eval_loss": eval_loss + 0.2},
             {"step": 20, "tokens": tokens, "lr": 0.001, "loss": eval_loss + 0.1},
             {"step": 20, "eval_loss": eval_loss, "eval_bpb": eval_loss / 3}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_run_directories_give_model_params_and_final_eval_loss(tmp_path):
    a = _run_dir(tmp_path, "a", {"preset": "proxy-9m"}, 1000, 3.5)
    b = _run_dir(tmp_path, "b", {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "vocab_size": 512}, 2000, 3.2)
    table = load_runs([a, b])
    assert table.params[0] == preset("proxy-9m").non_embedding_params()
    assert table.params[1] == preset("tiny").non_embedding_params() + 2 * 2 * 64 * 32  # tiny uses GQA, b does not
    assert list(table.tokens) == [1000, 2000] and list(table.loss) == [3.5, 3.2]
    assert table.run == ["a", "b"]
    assert list(load_runs([a, b], loss_key="eval_bpb").loss) == [3.5 / 3, 3.2 / 3]  # per-byte loss, paper §4.5


def test_run_directory_without_a_model_or_eval_is_a_clear_error(tmp_path):
    d = _run_dir(tmp_path, "a", {"preset": "proxy-9m"}, 1000, 3.5)
    (d / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.01}}))
    with pytest.raises(MiniCPMError, match="cannot tell the model size"):
        load_runs([d])
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(MiniCPMError, match="no line with a finite 'eval_loss'"):
        load_runs([d])
