"""The campaign's fit (scaling/campaign.py fit_campaign): the spec's fit beside the paper's mode (§4.5: least squares,
curve_fit, on loss per byte), in DIR/fit.txt and a JSON each; the spec's fit keys (loss, method, law)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import yaml

from minicpm.errors import MiniCPMError
from minicpm.laws.chinchilla import ScalingLaw
from minicpm.scaling.campaign import fit_campaign
from minicpm.scaling.spec import load_campaign_spec

PAPER_LIKE = ScalingLaw(E=1.2, A=60.0, B=90.0, alpha=0.29, beta=0.23)
BYTES_PER_TOKEN = 3.2


def rows_of(law: ScalingLaw, noise: float) -> list[dict]:
    """A campaign's table: 6 sizes x 10N..60N; bits per byte from the loss at a fixed bytes per token."""
    n = np.repeat(np.geomspace(4e7, 2e9, 6), 6)
    d = n * np.tile([10, 20, 30, 40, 50, 60], 6)
    loss = law.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, noise, len(n)))
    return [{"N": a, "D": b, "flops": 6 * a * b, "loss": l, "bpb": l / np.log(2) / BYTES_PER_TOKEN, "run": f"r{i}"}
            for i, (a, b, l) in enumerate(zip(n, d, loss))]


def plan(out, **fit):
    spec = types.SimpleNamespace(fit_loss="loss", fit_method="huber", fit_law=None, fit_bootstrap=20)
    spec.__dict__.update(fit)
    return types.SimpleNamespace(spec=spec, out=out)


def test_campaign_report_shows_our_fit_and_the_papers_side_by_side(tmp_path):
    text = fit_campaign(plan(tmp_path), rows_of(PAPER_LIKE, noise=0.0))
    assert "Both fits side by side" in text and "paper (bpb, lsq)" in text
    ours = json.loads((tmp_path / "fit.json").read_text())
    paper = json.loads((tmp_path / "fit-bpb-lsq.json").read_text())
    assert ours["fit"]["method"] == "huber" and ours["fit"]["variant"] == "shared"
    assert paper["fit"]["method"] == "lsq" and paper["fit"]["variant"] == "chinchilla"
    # the paper's mode recovers the known exponents on noise-free data (per byte: the same law, scaled)
    assert paper["params"]["alpha"] == pytest.approx(0.29, rel=1e-3)
    assert paper["params"]["beta"] == pytest.approx(0.23, rel=1e-3)
    assert paper["params"]["E"] == pytest.approx(1.2 / np.log(2) / BYTES_PER_TOKEN, rel=1e-3)
    assert (tmp_path / "fit.txt").read_text().strip() == text.strip()


def test_a_spec_in_paper_mode_shows_ours_beside_it(tmp_path):
    text = fit_campaign(plan(tmp_path, fit_loss="bpb", fit_method="lsq"), rows_of(PAPER_LIKE, noise=0.002))
    assert json.loads((tmp_path / "fit.json").read_text())["fit"]["method"] == "lsq"
    assert json.loads((tmp_path / "fit-loss-huber.json").read_text())["fit"]["method"] == "huber"
    lines = text.splitlines()
    header = lines[lines.index("Both fits side by side") + 1]
    assert header.split() == ["paper", "(bpb,", "lsq)", "loss,", "huber"]  # the spec's own fit first


def test_missing_bits_per_byte_leave_the_paper_fit_out_with_a_note(tmp_path):
    rows = rows_of(PAPER_LIKE, noise=0.0)
    rows[0]["bpb"] = float("nan")
    text = fit_campaign(plan(tmp_path), rows)
    assert "paper (bpb, lsq): not fitted" in text and "column 'bpb' has missing values" in text


@pytest.mark.parametrize("fit, message", [
    ({"loss": "bpb", "method": "lsq", "law": "shared"}, "fit.law: the least-squares fit"),
    ({"law": "free"}, "fit.law"),
])
def test_spec_fit_law_is_checked(tmp_path, fit, message):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}}))
    spec = {"base": {"config": "recipe.yaml"}, "sizes": ["tiny"], "decay_points": [2, 4], "fit": fit}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(MiniCPMError, match=message):
        load_campaign_spec(tmp_path / "spec.yaml")


def test_spec_accepts_the_papers_mode_and_a_law(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}}))
    spec = {"base": {"config": "recipe.yaml"}, "sizes": ["tiny"], "decay_points": [2, 4],
            "fit": {"loss": "bpb", "method": "lsq", "law": "chinchilla"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_campaign_spec(tmp_path / "spec.yaml")
    assert (loaded.fit_loss, loaded.fit_method, loaded.fit_law) == ("bpb", "lsq", "chinchilla")
