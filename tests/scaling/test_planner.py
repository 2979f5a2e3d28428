"""`minicpm plan` and `minicpm report --prediction` (issue 12) on synthetic campaigns from a known law
(tests/planner_helpers.py): the plan's allocation, shape, batch, lr and schedule; its YAML trains as is; the holdout
error; the predicted curve; a run drawn against its prediction; bad input as one line and exit 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from minicpm.train.config import load_config
from minicpm.laws.curves import predict_loss
from minicpm.model.shapes import snap_shape
from minicpm.scaling.planner import PAPER_BATCH_LAW, make_plan, prediction_path, write_plan
from minicpm.scaling.prediction import against_prediction
from minicpm.report.run import load_run, write_report
from planner_helpers import BATCH, LR, SEQ, TRUTH, budget_for, make_campaign, mpl_of, trainer_lr, write_metrics, \
    write_windtunnel


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return make_campaign(tmp_path_factory.mktemp("campaign"))


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory):
    return write_windtunnel(tmp_path_factory.mktemp("tunnel"), batch_tokens_at_3=512.0, lr=0.02)


@pytest.fixture(scope="module")
def planned(campaign, tunnel):
    return make_plan(budget_for(1.2e5), campaign, windtunnel=tunnel, bootstrap=30)


def log_distance(n, target):
    return abs(math.log(n / target))


def test_plan_allocates_the_budget_to_a_buildable_compute_optimal_shape(planned):
    plan, cfg = planned
    budget = budget_for(1.2e5)
    assert plan.n_opt == pytest.approx(float(plan.law.n_opt(budget)))
    assert plan.n_opt == pytest.approx(float(TRUTH.n_opt(budget)), rel=0.3)  # the campaign's law, recovered
    m = plan.model
    assert m.hidden_size % plan.family.head_dim == 0 and m.num_attention_heads == m.hidden_size // 16
    assert m.num_hidden_layers == plan.family.depth(m.hidden_size) and m.intermediate_size == m.hidden_size * 5 // 2
    neighbours = [snap_shape(plan.family, plan.n_opt)] + [plan.family.shape(m.hidden_size + k) for k in (-16, 16)]
    assert neighbours[0] == m
    assert log_distance(plan.n, plan.n_opt) <= min(log_distance(x.non_embedding_params(), plan.n_opt)
                                                   for x in neighbours[1:])
    assert abs(6 * plan.n * plan.d - budget) <= 6 * plan.n * plan.tokens_per_step  # D = C/6N up to one step
    # the wind tunnel's batch law (bs = 4608/L^2) at the predicted loss, and its μP optimum
    assert plan.batch_wanted == pytest.approx(4608 / float(plan.law.loss(plan.n, budget / (6 * plan.n))) ** 2)
    assert plan.tokens_per_step % (SEQ * cfg.batch.micro_batch_size) == 0
    assert abs(plan.tokens_per_step - plan.batch_wanted) <= SEQ * cfg.batch.micro_batch_size / 2
    assert cfg.optim.lr == 0.02
    s = cfg.schedule
    assert (s.kind, s.decay, s.total_steps, s.decay_steps) == ("wsd", "exp", plan.total_steps,
                                                               round(0.1 * plan.total_steps))
    assert cfg.run.eval_every == plan.total_steps // 20 and cfg.run.init_from is None and cfg.run.out_dir is None
    # the predicted final loss: L(N, D) of the fitted law, its interval around it, close to the true law's
    assert plan.loss == pytest.approx(float(plan.law.loss(plan.n, plan.d)))
    assert plan.interval[0] < plan.loss < plan.interval[1]
    assert plan.loss == pytest.approx(float(TRUTH.loss(plan.n, plan.d)), rel=0.01)


def test_plan_without_a_wind_tunnel_uses_the_papers_batch_law_and_lr(campaign):
    plan, cfg = make_plan(budget_for(1.2e5), campaign, bootstrap=20)
    a, b = PAPER_BATCH_LAW
    assert plan.batch_wanted == pytest.approx(a / float(plan.law.loss(plan.n, budget_for(1.2e5) / (6 * plan.n))) ** b)
    assert cfg.optim.lr == 0.01 and "paper" in plan.tunnel.batch_source
    # the paper's batch law (~1M tokens at L ~ 3) leaves this small budget a handful of steps: the plan says so
    assert plan.total_steps < 100 and f"note: only {plan.total_steps} steps" in plan.text()
    fixed, cfg = make_plan(budget_for(1.2e5), campaign, bootstrap=20, batch_tokens=1024)
    assert cfg.batch.tokens_per_step == fixed.tokens_per_step == 1024 and "note" not in fixed.text()


def test_a_curve_moved_too_far_onto_the_law_is_not_drawn(campaign, tunnel, monkeypatch):
    from minicpm.scaling import planner

    monkeypatch.setattr(planner, "MAX_CURVE_SHIFT", 0.01)
    plan, _ = make_plan(budget_for(1.2e5), campaign, windtunnel=tunnel, bootstrap=20)
    assert plan.curve is None and "too far beyond the campaign's curves" in plan.curve_note


def test_predicted_curve_comes_from_the_campaigns_curves_and_ends_at_the_law(planned):
    plan, _ = planned
    curve = plan.curve
    assert curve["fitted_on"] == ["stable", "decay100", "decay200", "decay300", "decay400"]
    tokens, loss, lo, hi = (np.array(curve[k]) for k in ("tokens", "loss", "lo", "hi"))
    assert tokens[-1] == pytest.approx(plan.d, abs=BATCH)
    assert loss[-1] == pytest.approx(plan.loss)
    assert np.all(lo < loss) and np.all(loss < hi)
    decay_start = plan.d * 0.9
    assert loss[-1] < np.interp(decay_start, tokens, loss) - 0.05  # the WSD decay shows in the predicted curve
    # the fitted law reproduces the campaign's curves (the largest size's multi-power parameters)
    lr = trainer_lr(lambda s: min(1.0, (s + 1) / 10), 400)
    truth = mpl_of(plan.family.base.non_embedding_params())
    steps = np.arange(50, 401, 25)
    assert predict_loss("mpl", curve["params"], lr, steps) == pytest.approx(predict_loss("mpl", truth, lr, steps),
                                                                             rel=3e-3)


def test_holdout_largest_reports_how_far_the_refit_lands(tmp_path):
    exact = make_campaign(tmp_path / "exact", noise=0.0)
    plan, _ = make_plan(budget_for(1.2e5), exact, holdout="largest", bootstrap=20)
    assert plan.holdout["mean_abs_rel_err"] < 2e-4  # the table follows the law exactly: the refit predicts it
    # the largest size 5% worse than the law says: the holdout error shows it
    table = (exact / "campaign.csv").read_text().splitlines()
    shifted = [table[0]] + [",".join(r.split(",")[:4] + [f"{float(r.split(',')[4]) * 1.05:.6f}"] + r.split(",")[5:])
                            if r.startswith("w128,") else r for r in table[1:]]
    (exact / "campaign.csv").write_text("\n".join(shifted) + "\n")
    plan, _ = make_plan(budget_for(1.2e5), exact, holdout="largest", bootstrap=20)
    assert plan.holdout["mean_abs_rel_err"] == pytest.approx(0.05 / 1.05, rel=0.05)
    assert "holdout largest" in plan.text() and f"{plan.holdout['mean_abs_rel_err']:.2%}" in plan.text()


@pytest.mark.slow
def test_plan_yaml_trains_unchanged(tmp_path, datasets, minicpm):
    tokenizer, code, _ = datasets
    campaign = make_campaign(tmp_path / "campaign", {"code": code, "tokenizer": tokenizer})
    tunnel = write_windtunnel(tmp_path / "tunnel", batch_tokens_at_3=512.0)
    done = minicpm("plan", "--budget", "1e9", "--campaign", campaign, "--windtunnel", tunnel, "--out", "plan.yaml",
                   "--bootstrap", "20", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = load_config(tmp_path / "plan.yaml")
    assert cfg.schedule.total_steps <= 30  # a tiny budget: a tiny run
    trained = minicpm("train", "plan.yaml", "--out", "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert f"at step {cfg.schedule.total_steps}" in trained.stdout
    written = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert written["model"]["hidden_size"] == cfg.model.hidden_size and written["optim"]["lr"] == 0.02
    report = minicpm("report", "run", "--prediction", "plan.yaml", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "run: last eval at step" in report.stdout and (tmp_path / "report/prediction.png").is_file()


def run_with_evals(root, cfg_from, tokens, evals):
    """A run directory with the plan's config and the given eval losses at the given tokens."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(cfg_from.read_text())
    tps = yaml.safe_load(cfg_from.read_text())["batch"]["tokens_per_step"]
    lines = [{"step": int(t // tps), "tokens": int(t), "lr": 0.01, "loss": float(v) + 0.01} for t, v in
             zip(tokens, evals)] + [{"step": int(t // tps), "tokens": int(t), "eval_loss": float(v)}
                                    for t, v in zip(tokens, evals)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_report_says_how_far_the_last_eval_is_from_the_plan(planned, tmp_path):
    plan, cfg = planned
    written = write_plan(plan, cfg, tmp_path / "plan.yaml")
    assert written == [tmp_path / "plan.yaml", prediction_path(tmp_path / "plan.yaml")]
    curve = plan.curve
    tokens = np.array(curve["tokens"][10::40])
    on_plan = np.interp(tokens, curve["tokens"], curve["loss"])
    run = run_with_evals(tmp_path / "run", tmp_path / "plan.yaml", tokens, on_plan * 1.004)
    line, png = against_prediction(load_run(run), tmp_path / "plan.yaml")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    lo, hi = (np.interp(tokens[-1], curve["tokens"], curve[k]) for k in ("lo", "hi"))
    assert "+0.40%" in line and ("inside the band" if lo <= on_plan[-1] * 1.004 <= hi else "above the band") in line
    off = run_with_evals(tmp_path / "off", tmp_path / "plan.yaml", tokens, on_plan * 1.2)
    assert "+20.00%, above the band" in against_prediction(load_run(off), tmp_path / "plan.yaml")[0]
    out = write_report([run], tmp_path / "report", prediction=tmp_path / "plan.yaml")
    assert tmp_path / "report/prediction.png" in out
    assert "Against the prediction:" in (tmp_path / "report/report.html").read_text()


def test_report_against_a_curve_law_fit_uses_the_runs_own_schedule(tmp_path):
    from planner_helpers import run_config

    run = tmp_path / "run"
    run_config(run, 64, 3, {}, "schedule.kind=wsd", "schedule.total_steps=200", "schedule.decay_steps=20")
    from minicpm.laws.tables import load_schedule

    schedule = load_schedule(run / "config.yaml")
    law = mpl_of(1e5)
    steps = np.arange(10, 201, 10)
    write_metrics(run, schedule, steps, predict_loss("mpl", law, schedule, steps) / 1.01)  # eval = 1.01 x loss
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"law": "mpl", "params": law, "curves": [{"rmse_rel": 0.002}]}))
    line, _ = against_prediction(load_run(run), fit)
    assert "last eval at step 200" in line and "+0.00%, inside the band" in line


def set_field(directory, column: str, value: str) -> None:
    """Set `column` of the first row of DIR/campaign.csv."""
    head, first, *rest = (directory / "campaign.csv").read_text().splitlines()
    cells = first.split(",")
    cells[head.split(",").index(column)] = value
    (directory / "campaign.csv").write_text("\n".join([head, ",".join(cells), *rest]) + "\n")


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "campaign.csv").unlink(), "campaign.csv: no such file"),
    (lambda d: set_field(d, "loss", "nan"), "column 'loss' must be a positive finite number, got 'nan'"),
    (lambda d: (d / "campaign.csv").write_text("\n".join(
        r for r in (d / "campaign.csv").read_text().splitlines() if not r.startswith("w32,") or "decay100" in r)),
     "size 'w32' has one point"),
    (lambda d: set_field(d, "D", "0"), "column 'D' must be a positive finite number, got '0'"),
])
def test_bad_campaign_is_one_line_and_exit_2(tmp_path, minicpm, change, message):
    campaign = make_campaign(tmp_path / "c", widths={32: 2, 48: 2, 64: 3})
    change(campaign)
    done = minicpm("plan", "--budget", "1e12", "--campaign", campaign, "--out", "p.yaml", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr and not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("args, message", [
    (["--budget", "-5"], "--budget must be a positive number"),
    (["--budget", "1e12", "--windtunnel", "nowhere"], "--windtunnel nowhere: no such directory"),
    (["--budget", "1e12", "--out", "plan.txt"], "name it .yaml"),
])
def test_bad_options_are_one_line_and_exit_2(campaign, tmp_path, minicpm, args, message):
    if "--out" not in args:
        args = [*args, "--out", "p.yaml"]
    done = minicpm("plan", "--campaign", campaign, *args, "--bootstrap", "10", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr
