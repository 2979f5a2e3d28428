"""What a plan says about where its numbers come from: without a wind-tunnel batch law it says the batch comes from
the paper's C4 law applied to this campaign's loss (and prefers a law of the user's own data); the plan config
carries its prediction (run.prediction) so the run it trains compares itself with it at every evaluation."""

from __future__ import annotations

import pytest
from planner_helpers import budget_for, make_campaign, write_windtunnel

from minicpm.scaling.planner import make_plan, prediction_path, write_plan
from minicpm.train.config import load_config


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return make_campaign(tmp_path_factory.mktemp("campaign"))


def test_a_plan_without_a_wind_tunnel_says_its_batch_comes_from_the_papers_c4_law(campaign, tmp_path):
    plan, _ = make_plan(budget_for(1.2e5), campaign, bootstrap=20)
    text = plan.text()
    assert "no wind-tunnel batch law" in text and "1.21e+09/L^6.24" in text and "preferred" in text
    tunnel = write_windtunnel(tmp_path / "tunnel")
    plan, _ = make_plan(budget_for(1.2e5), campaign, windtunnel=tunnel, bootstrap=20)
    assert "no wind-tunnel batch law" not in plan.text()


def test_the_plan_config_carries_its_prediction(campaign, tmp_path):
    plan, cfg = make_plan(budget_for(1.2e5), campaign, bootstrap=20)
    write_plan(plan, cfg, tmp_path / "plan.yaml")
    written = load_config(tmp_path / "plan.yaml")
    assert written.run.prediction == str(prediction_path(tmp_path / "plan.yaml"))
