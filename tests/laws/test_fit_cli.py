"""`minicpm scaling fit | fit-curve | predict-curve` end to end through the command line, on files made by the test."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import yaml

from minicpm.laws.curves import predict_loss
from minicpm.laws.chinchilla import PARAMS, ScalingLaw
from minicpm.optim.schedule import constant_schedule, wsd_schedule

TRUE = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def lr_of(schedule, total, **kw):
    return 0.01 * np.array([schedule(step, **kw) for step in range(total + 1)])


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["run,params,tokens,loss"]
    for n in np.geomspace(1e7, 1e9, 5):
        for k in (10, 20, 30, 40, 50, 60):  # decays branched at 10N..60N tokens, as in paper §4.5
            rows.append(f"N{n:.2g}-{k}N,{n:.0f},{k * n:.0f},{TRUE.loss(n, k * n) * np.exp(rng.normal(0, 0.01)):.5f}")
    path = tmp_path / "table.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_scaling_fit_json(table, tmp_path, cli):
    r = cli("scaling", "fit", table, "--json", "--law", "chinchilla", cwd=tmp_path)  # the truth has alpha != beta
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["params"]) == set(PARAMS) and doc["fit"]["variant"] == "chinchilla"
    for p in PARAMS:
        lo, hi = doc["intervals"][p]
        assert lo <= doc["params"][p] <= hi
        assert lo <= getattr(TRUE, p) <= hi, p
    assert len(doc["compute_optimal"]["budgets"]) == 4 and len(doc["residuals"]) == 30


@pytest.mark.slow
def test_scaling_fit_table_plan_and_plots(table, tmp_path, cli):
    r = cli("scaling", "fit", table, "--budget", "1e21", "1e22", "--predict", "2e9:4e10", "--bootstrap", "50",
            "--plot", tmp_path / "plots", "--out", tmp_path / "fit.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Compute-optimal allocation" in r.stdout and "held out largest size" in r.stdout
    plan = [line for line in r.stdout.splitlines() if line.strip().startswith(("1e+21", "1e+22"))]
    assert len(plan) == 2
    for name in ("loss_vs_tokens.png", "compute_optimal.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "fit.json").read_text())["predictions"][0]["params"] == 2e9


def test_scaling_fit_bad_input_is_one_line_and_nonzero(tmp_path, cli):
    (tmp_path / "t.csv").write_text("params,loss\n1e8,3.0\n")
    r = cli("scaling", "fit", tmp_path / "t.csv", cwd=tmp_path)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "missing column 'tokens'" in r.stderr


def test_scaling_fit_batch_size_law(tmp_path, cli):
    loss = np.linspace(2.2, 3.8, 12)
    rows = ["loss,batch_tokens"] + [f"{l},{1.21e9 / l ** 6.24:.0f}" for l in loss]
    (tmp_path / "bs.csv").write_text("\n".join(rows) + "\n")
    r = cli("scaling", "fit", tmp_path / "bs.csv", "--form", "batch", "--json", "--at-loss", "2.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["params"]["b"] == pytest.approx(6.24, rel=1e-3)
    assert doc["predictions"][0]["batch_tokens"] == pytest.approx(1.21e9 / 2.5 ** 6.24, rel=1e-3)


def test_fit_curve_then_predict_curve(tmp_path, cli):
    truth = {"L0": 3.0, "A": 1.0, "alpha": 0.5, "C": 0.08, "lambda": 0.995}
    steps = np.arange(1001)
    curves = {"constant": lr_of(constant_schedule, 1000, warmup_steps=20),
              "wsd": lr_of(wsd_schedule, 1000, warmup_steps=20, decay_start=700, decay_steps=300, decay="linear")}
    for name, lr in curves.items():
        logged = steps[10::10]
        loss = predict_loss("tissue", truth, lr, logged)
        rows = ["step,lr,loss"] + [f"{s},{lr[s]:.8g},{y:.6f}" for s, y in zip(logged, loss)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    r = cli("scaling", "fit-curve", "constant.csv", "wsd.csv", "--law", "tissue", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fit = json.loads(r.stdout)
    assert set(fit["params"]) == {"L0", "A", "alpha", "C", "lambda"}
    (tmp_path / "fit.json").write_text(r.stdout)

    (tmp_path / "wsd.yaml").write_text(yaml.safe_dump({"lr": 0.01, "warmup_steps": 20, "total_steps": 1000,
                                                       "decay_steps": 300, "decay": "exp", "half_life": 60}))
    r = cli("scaling", "predict-curve", "fit.json", "wsd.yaml", "--every", "100", "--plot", "plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == ["step", "lr", "predicted_loss"]
    assert [int(x["step"]) for x in rows] == list(range(100, 1001, 100))
    lr = lr_of(wsd_schedule, 1000, warmup_steps=20, decay_start=700, decay_steps=300, decay="exp", half_life=60)
    expected = predict_loss("tissue", truth, lr, np.arange(100, 1001, 100))
    np.testing.assert_allclose([float(x["predicted_loss"]) for x in rows], expected, rtol=2e-3)
    assert (tmp_path / "plots" / "predicted_curve.png").exists()

    (tmp_path / "bad.json").write_text(json.dumps({"law": "tissue", "params": {"L0": 3.0}}))
    r = cli("scaling", "predict-curve", "bad.json", "wsd.yaml", cwd=tmp_path)
    assert r.returncode != 0 and "params.A must be a finite number" in r.stderr
