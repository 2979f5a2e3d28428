"""The WSD scaling campaign (scaling/campaign.py): trained in this process, killed with SIGKILL and resumed, its runs
as Slurm jobs (submitit's local executor); the least-squares fit (laws.chinchilla.fit_lsq), the schedule comparison
(scaling/schedules.py) and the one-line errors of bad specs and tables."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from process_helpers import left_running, wait_for

from minicpm.errors import MiniCPMError
from minicpm.scaling.campaign import CSV_COLUMNS, plan_campaign, run_campaign
from minicpm.scaling.spec import load_campaign_spec
from minicpm.laws.chinchilla import PARAMS, ScalingLaw, bootstrap_chinchilla, fit_chinchilla, fit_lsq
from minicpm.laws.tables import RunTable, load_table, run_dir_row
from minicpm.laws.report import analyse_table, report_json
from minicpm.scaling.schedules import compare_schedules

PAPER_LIKE = ScalingLaw(E=1.2, A=60.0, B=90.0, alpha=0.29, beta=0.23)
"""Exponents of paper §4.5 (alpha 0.29, beta 0.23), constants of a plausible nats/token loss."""


def generated_table(law: ScalingLaw, noise: float, seed: int = 0) -> RunTable:
    """6 sizes x 6 decay points (10N..60N), as the paper's campaign, Gaussian noise on the raw loss."""
    n = np.repeat(np.geomspace(4e7, 2e9, 6), 6)
    d = n * np.tile([10, 20, 30, 40, 50, 60], 6)
    loss = law.loss(n, d) + np.random.default_rng(seed).normal(0, noise, len(n))
    return RunTable(n, d, loss, [f"r{i}" for i in range(len(n))], source="generated")


# ---------------------------------------------------------------- fit --method lsq

def test_lsq_recovers_known_constants_exactly_without_noise():
    table = generated_table(PAPER_LIKE, noise=0.0)
    fit = fit_lsq(table.params, table.tokens, table.loss)
    for p in PARAMS:
        assert getattr(fit.law, p) == pytest.approx(getattr(PAPER_LIKE, p), rel=1e-4), p
    assert fit.method == "lsq" and fit.objective < 1e-8


def test_lsq_recovers_known_constants_inside_its_intervals_and_reports_the_allocation():
    table = generated_table(PAPER_LIKE, noise=0.004, seed=0)
    report = analyse_table(table, n_boot=40, seed=0, confidence=0.95, method="lsq")
    intervals = report.boot.intervals()
    for p in PARAMS:
        lo, hi = intervals[p]
        assert lo <= getattr(PAPER_LIKE, p) <= hi, (p, lo, hi)
    assert report.fit.law.alpha == pytest.approx(0.29, abs=0.04)
    assert report.fit.law.beta == pytest.approx(0.23, abs=0.04)
    doc = report_json(report)
    assert doc["fit"]["method"] == "lsq"
    optimal = doc["compute_optimal"]
    law = report.fit.law
    assert optimal["eta"] == pytest.approx((law.beta - law.alpha) / (law.alpha + law.beta))
    assert optimal["K2"] == pytest.approx(law.K ** 2)
    budget = optimal["budgets"][0]
    assert budget["tokens_per_param"] == pytest.approx(budget["d_opt"] / budget["n_opt"])
    lo, hi = budget["intervals"]["tokens_per_param"]
    assert lo <= budget["tokens_per_param"] <= hi


def test_huber_and_lsq_agree_within_their_intervals_on_the_same_table():
    table = generated_table(PAPER_LIKE, noise=0.004, seed=2)
    huber = fit_chinchilla(table.params, table.tokens, table.loss)
    lsq = fit_lsq(table.params, table.tokens, table.loss)
    boot = bootstrap_chinchilla(table, lsq, n_boot=40, seed=0).intervals()
    for p in ("E", "alpha", "beta"):
        lo, hi = boot[p]
        assert lo <= getattr(huber.law, p) <= hi, (p, getattr(huber.law, p), lo, hi)


# ---------------------------------------------------------------- bad tables

@pytest.mark.parametrize("rows, message", [
    ([("s", 1e6, 1e7, "nan")], "column 'loss' must be a positive finite number"),
    ([("s", 1e6, 0, 3.0)], "column 'tokens' must be a positive finite number"),
    ([("a", 1e6, 1e7, 3.0), ("a", 1e6, 2e7, 2.9), ("b", 2e6, 1e7, 2.8)], "size 'b' has one point"),
])
def test_bad_campaign_tables_are_one_line_errors(tmp_path, rows, message):
    path = tmp_path / "campaign.csv"
    path.write_text("size,N,D,loss\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    with pytest.raises(MiniCPMError, match=message) as e:
        load_table(path)
    assert "\n" not in str(e.value)


def test_a_bad_table_exits_2_with_one_line(tmp_path, minicpm):
    path = tmp_path / "campaign.csv"
    path.write_text("size,N,D,flops,loss,bpb,run\na,1e6,1e7,6e13,nan,1.0,a/x\na,1e6,2e7,1.2e14,2.9,1.0,a/y\n")
    result = minicpm("scaling", "fit", path, "--method", "lsq")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "loss" in result.stderr


# ---------------------------------------------------------------- specs

def write_recipe(directory: Path, datasets) -> Path:
    tokenizer, code, prose = datasets
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "data": {"stable": {str(code): 0.5, str(prose): 0.5}, "decay": {str(code): 0.2, str(prose): 0.8},
                 "tokenizer": str(tokenizer), "eval_sequences": 4},
        "schedule": {"warmup_steps": 2}, "optim": {"lr": 0.02},
        "batch": {"tokens_per_step": 512, "seq_len": 32, "micro_batch_size": 16},
        "run": {"device": "cpu", "log_every": 4}}))
    return path


@pytest.fixture
def recipe(tmp_path, datasets):
    return write_recipe(tmp_path, datasets)


def write_spec(directory: Path, name: str = "spec.yaml", **fields) -> Path:
    spec = {"base": {"config": "recipe.yaml"}, "shape": {"head_dim": 16},
            "sizes": [{"name": "w16", "width": 16, "depth": 1}, {"name": "w32", "width": 32, "depth": 1}],
            "decay_points": [2, 4], "decay_fraction": 0.2, "workers": 0, **fields}
    spec = {k: v for k, v in spec.items() if v is not None}
    path = directory / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"decay_points": [10]}, "decay_points: one point per size"),
    ({"decay_points": [0, 10]}, r"decay_points\[0\]: expected a positive multiple of N"),
    ({"decay_points": [10, 20], "stable_until": 15}, "decay_points: 20N lies beyond the stable run"),
    ({"decay_fraction": 1.5}, "decay_fraction: expected a fraction"),
    ({"sizes": [{"name": "odd", "width": 40, "depth": 1}]}, r"sizes\[0\].width: 40 is not a multiple"),
    ({"sizes": ["proxy-1t"]}, r"sizes\[0\]: expected a model preset \(tiny, proxy-9m, "),
    ({"tokens": [10]}, "tokens: unknown key"),
])
def test_bad_specs_are_one_line_errors(tmp_path, recipe, fields, message):
    with pytest.raises(MiniCPMError, match=message) as e:
        load_campaign_spec(write_spec(tmp_path, **fields))
    assert "\n" not in str(e.value) and "spec.yaml" in str(e.value)


def test_a_point_of_zero_steps_is_refused_before_training(tmp_path, recipe):
    spec = load_campaign_spec(write_spec(tmp_path, decay_points=[0.01, 4]))
    with pytest.raises(MiniCPMError, match=r"decay_points: 0.01N = 30 tokens is 0 step\(s\)"):
        plan_campaign(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()


def test_a_bad_spec_exits_2_with_one_line(tmp_path, recipe, minicpm):
    result = minicpm("scaling", "campaign", write_spec(tmp_path, decay_points=[10]), "--out", tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "one point per size" in result.stderr


def test_the_plan_branches_at_k_N_tokens_and_counts_the_saving(tmp_path, recipe):
    spec = load_campaign_spec(write_spec(tmp_path, decay_points=[2, 4, 6], decay_fraction=0.1))
    plan = plan_campaign(spec, tmp_path / "out")
    n16, n32 = 2992, 11872  # non-embedding parameters of widths 16 and 32, one layer, d_ff = 2.5 d
    assert [(b.n, b.step, b.decay_steps) for b in plan.branches] == [
        (n16, round(2 * n16 / 512), 1), (n16, round(4 * n16 / 512), 2), (n16, round(6 * n16 / 512), 4),
        (n32, round(2 * n32 / 512), 5), (n32, round(4 * n32 / 512), 9), (n32, round(6 * n32 / 512), 14)]
    cost = plan.cost()
    assert cost.trained == (35 + 139 + 1 + 2 + 4 + 5 + 9 + 14) * 512
    assert cost.cosine == sum(b.step + b.decay_steps for b in plan.branches) * 512
    assert "fewer" in cost.line() and f"{cost.trained:,}" in cost.line()


# ---------------------------------------------------------------- the campaign, trained

def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, datasets):
    """One tiny campaign (2 sizes x 2 points) trained in this process, shared by the tests that read it."""
    import torch

    directory = tmp_path_factory.mktemp("campaign")
    write_recipe(directory, datasets)
    spec = write_spec(directory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield spec, run_campaign(spec, directory / "full", fit=False, echo=lambda line: None)
    finally:
        torch.set_num_threads(threads)


def test_the_campaign_table_has_one_row_per_branch_with_the_fitters_N(campaign):
    spec, result = campaign
    rows = read_csv(result.csv)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["run"] for r in rows] == ["w16/decay-2N", "w16/decay-4N", "w32/decay-2N", "w32/decay-4N"]
    for r in rows:
        branch = result.plan.out / "runs" / r["run"]
        fitter = run_dir_row(branch)  # what `minicpm scaling fit RUN_DIR` reads
        assert int(r["N"]) == fitter["params"] and int(r["D"]) == fitter["tokens"]
        assert float(r["loss"]) == fitter["loss"]
        assert float(r["flops"]) == pytest.approx(6 * int(r["N"]) * int(r["D"]), rel=1e-5)
        assert 0 < float(r["bpb"]) < float(r["loss"]) * 2
    table = load_table(result.csv)  # the fit reads the campaign's columns
    assert list(table.params) == [float(r["N"]) for r in rows]


def test_a_campaign_interrupted_and_resumed_writes_the_uninterrupted_table(campaign, tmp_path):
    spec, full = campaign
    plan = plan_campaign(load_campaign_spec(spec), tmp_path / "cut")
    jobs = {j.name: j for j in plan.jobs}
    stable, first_branch = jobs["w32/stable"], jobs["w32/decay-2N"]
    # killed after the first stable stage and the first branch: the rest is left to the resumed campaign
    stable.work(**{**stable.kwargs, "stages": stable.kwargs["stages"][:1]})
    first_branch.run()
    resumed = run_campaign(spec, tmp_path / "cut", fit=False, echo=lambda line: None)
    assert read_csv(resumed.csv) == read_csv(full.csv)
    again = run_campaign(spec, tmp_path / "cut", fit=False, echo=lambda line: None)
    assert read_csv(again.csv) == read_csv(full.csv)


@pytest.mark.slow
@pytest.mark.parametrize("whom", ["the campaign", "its process group"])
def test_a_campaign_killed_with_sigkill_leaves_no_run_behind_and_resumes_to_the_same_table(campaign, datasets,
                                                                                          tmp_path, whom):
    _, full = campaign
    write_recipe(tmp_path, datasets)
    spec = write_spec(tmp_path, workers=2)
    command = [sys.executable, "-m", "minicpm", "scaling", "campaign", str(spec), "--out", "camp", "--no-fit"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    owners = [tmp_path / "camp/runs" / size / "stable/.lock.owner" for size in ("w32", "w16")]
    wait_for(owners[0].is_file, 120, "the largest stable run never started")
    # frozen, a run cannot end on its own before the check below: only the death of its campaign can end it
    for owner in owners:
        try:
            os.kill(int(owner.read_text().split()[1]), signal.SIGSTOP)
        except (OSError, ProcessLookupError):
            pass  # the smaller run finished meanwhile
    if whom == "the campaign":
        launcher.kill()
    else:
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    left = left_running(tmp_path, timeout=15)
    assert not left, f"still running after {whom} was killed: {left}"  # a run, the fork server

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert read_csv(tmp_path / "camp/campaign.csv") == read_csv(full.csv)


@pytest.mark.slow
def test_a_campaign_with_launcher_slurm_submits_every_run_through_submitit(campaign, datasets, tmp_path):
    """submitit's local executor runs each submitted job as a process here, as Slurm would on a node."""
    _, full = campaign
    write_recipe(tmp_path, datasets)
    spec = write_spec(tmp_path, workers=2, launcher="slurm", slurm={"time": 10, "cpus": 1})
    lines = []
    result = run_campaign(spec, tmp_path / "camp", launcher={"cluster": "local"}, fit=False, echo=lines.append)
    assert read_csv(result.csv) == read_csv(full.csv)
    submitted = [line for line in lines if ": training " in line]
    assert len(submitted) == 6 and all("(slurm job " in line for line in submitted), lines
    assert len(list((tmp_path / "camp/slurm").glob("*/*_submitted.pkl"))) == 6  # submitit's record of each job
    log = (tmp_path / "camp/runs/w32/decay-4N/job.log").read_text()
    assert log.startswith("$ minicpm.scaling.decay:branch_decay(") and "minicpm train:" in log


@pytest.mark.parametrize("fields, message", [
    ({"launcher": "mpirun"}, "launcher: expected local | torchrun | slurm, got 'mpirun'"),
    ({"nproc_per_node": 2}, "nproc_per_node: 2 processes per run need launcher: torchrun"),
    ({"launcher": "slurm", "slurm": {"gpu": 1}}, "slurm.gpu: unknown key"),
    ({"launcher": "slurm", "slurm": {"time": 0}}, "slurm.time: expected an integer >= 1, got 0"),
])
def test_bad_launcher_keys_are_one_line_errors(tmp_path, recipe, fields, message):
    with pytest.raises(MiniCPMError, match=message) as e:
        load_campaign_spec(write_spec(tmp_path, **fields))
    assert "spec.yaml" in str(e.value)


def test_a_launcher_other_than_local_cannot_train_in_this_process(tmp_path, recipe):
    spec = write_spec(tmp_path, launcher="torchrun", nproc_per_node=2, workers=0)
    with pytest.raises(MiniCPMError, match="workers: 0 trains every run in this process, which launcher torchrun"):
        run_campaign(spec, tmp_path / "out", fit=False, echo=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_a_different_spec_in_the_same_directory_is_refused(campaign):
    spec, full = campaign
    changed = write_spec(spec.parent, "changed.yaml", decay_points=[2, 5])
    with pytest.raises(MiniCPMError, match="different spec"):
        run_campaign(changed, full.plan.out, fit=False, echo=lambda line: None)


# ---------------------------------------------------------------- compare-schedules

def test_compare_schedules_trains_every_schedule_at_equal_tokens(tmp_path, recipe):
    spec = tmp_path / "schedules.yaml"
    # data.decay=null: every arm on the one mixture (scaling/schedules.py refuses arms whose data differ)
    spec.write_text(yaml.safe_dump({"base": {"config": "recipe.yaml", "overrides": ["data.decay=null"]},
                                    "shape": {"head_dim": 16},
                                    "sizes": [{"name": "w16", "width": 16, "depth": 1}], "tokens": [8],
                                    "decay_fractions": [0.1, 0.25], "workers": 0}))
    result = compare_schedules(spec, tmp_path / "out", echo=lambda line: None)
    rows = read_csv(result.csv)
    assert [r["schedule"] for r in rows] == ["cosine", "wsd-10%", "wsd-25%", "constant"]
    assert len({r["D"] for r in rows}) == 1  # equal tokens
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    stable = run_dir_row(tmp_path / "out" / "runs" / "w16" / "stable")
    assert float(rows[-1]["loss"]) == stable["loss"]  # constant LR: the stable run at D
    assert result.plot is not None and result.plot.stat().st_size > 0
    assert "best" in result.summary()
