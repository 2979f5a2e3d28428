"""A run carries its plan's prediction while it trains (run.prediction, train/prediction.py): each evaluation logs
the predicted loss and band at its tokens (eval/prediction/*, equal to the plan's curve there), shows them, and a run
that leaves the band is warned once each time it leaves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import PatternData, metrics_without_timing, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.train.loop import Trainer
from minicpm.train.prediction import load_plan_prediction

TOKENS_PER_STEP = 256


class ScriptedLoss:
    """An evaluator whose eval_loss at each evaluation is given: where the run lies against the band is the test's
    to choose (a real evaluator's loss on a tiny model says nothing about a plan)."""

    name, every, aliases = "scripted", 2, {"loss": "eval_loss"}

    def __init__(self, losses: dict[int, float]):
        self.losses, self.calls = losses, 0

    def __call__(self, target):
        self.calls += 1
        return {"loss": self.losses[self.calls]}


def write_plan_prediction(path, tokens, loss, width=0.1):
    doc = {"kind": "plan", "loss_key": "eval_loss", "final": {"tokens": tokens[-1], "loss": loss[-1],
                                                              "interval": [loss[-1] - width, loss[-1] + width]},
           "curve": {"tokens": list(tokens), "loss": list(loss), "lo": [v - width for v in loss],
                     "hi": [v + width for v in loss]}}
    path.write_text(json.dumps(doc))
    return path


def test_every_evaluation_logs_the_plans_curve_and_leaving_the_band_warns_once(tmp_path, capsys):
    curve_tokens = np.linspace(TOKENS_PER_STEP, 12 * TOKENS_PER_STEP, 7)  # points between the evaluations
    curve_loss = 5.0 - 0.2 * np.arange(7)
    plan = write_plan_prediction(tmp_path / "plan.prediction.json", curve_tokens, curve_loss)
    cfg = tiny_config(tmp_path / "run", "run.eval_every=2", f"run.prediction={plan}")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    predicted = {s: float(np.interp(s * TOKENS_PER_STEP, curve_tokens, curve_loss)) for s in range(2, 13, 2)}
    # inside, inside, above (+0.25), still above, back inside, below (-0.3)
    offsets = {2: 0.0, 4: 0.05, 6: 0.25, 8: 0.3, 10: -0.02, 12: -0.3}
    trainer.evaluators = [ScriptedLoss({i + 1: predicted[s] + offsets[s] for i, s in enumerate(sorted(offsets))})]
    trainer.fit()
    evals = [r for r in metrics_without_timing(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    for r in evals:
        assert r["eval/prediction/loss"] == pytest.approx(predicted[r["step"]], rel=1e-12)
        assert r["eval/prediction/lo"] == pytest.approx(predicted[r["step"]] - 0.1, rel=1e-12)
        assert r["eval/prediction/hi"] == pytest.approx(predicted[r["step"]] + 0.1, rel=1e-12)
        assert r["eval/prediction/rel"] == pytest.approx(r["eval_loss"] / predicted[r["step"]] - 1, rel=1e-9)
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    warnings = [line for line in lines if "left the predicted band" in line]
    assert len(warnings) == 2  # on leaving at step 6 and again at step 12, not while it stays out at step 8
    assert warnings[0].startswith("warning: step 6:") and "+0.1500" in warnings[0] and "above" in warnings[0]
    assert warnings[1].startswith("warning: step 12:") and "-0.2000" in warnings[1] and "below" in warnings[1]
    eval_lines = [line for line in lines if line.startswith("step ") and "eval_loss" in line]
    assert len(eval_lines) == 6 and all("predicted " in line and "[" in line for line in eval_lines)


def test_run_prediction_reads_a_plan_yaml_or_its_json_and_refuses_anything_else(tmp_path):
    plan = write_plan_prediction(tmp_path / "plan.prediction.json", [100.0, 200.0], [4.0, 3.5])
    (tmp_path / "plan.yaml").write_text("model: {preset: tiny}\n")
    assert load_plan_prediction(tmp_path / "plan.yaml").at(150.0) == pytest.approx((3.75, 3.65, 3.85))
    assert load_plan_prediction(plan).at(250.0) is None  # past the predicted tokens: nothing to compare
    with pytest.raises(MiniCPMError, match="no such file"):
        load_plan_prediction(tmp_path / "missing.json")
    (tmp_path / "fit.json").write_text(json.dumps({"law": "mpl", "params": {}}))
    with pytest.raises(MiniCPMError, match="not a plan's prediction.*minicpm report RUN --prediction"):
        load_plan_prediction(tmp_path / "fit.json")
    (tmp_path / "other.yaml").write_text("model: {preset: tiny}\n")
    with pytest.raises(MiniCPMError, match="no other.prediction.json beside it"):
        load_plan_prediction(tmp_path / "other.yaml")
