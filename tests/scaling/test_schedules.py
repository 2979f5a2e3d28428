"""The schedule comparison's fair-comparison guard (scaling/schedules.py): its arms must train on the same data
unless the spec says otherwise (allow_different_data), and the shipped demo spec is fair."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import minicpm
from minicpm.errors import MiniCPMError
from minicpm.scaling.campaign import recipe_config
from minicpm.scaling.schedules import check_same_data, plan_comparison
from minicpm.scaling.spec import load_campaign_spec

STABLE = {"code": 0.5, "prose": 0.5}


def write_case(directory: Path, *, decay: dict | None, overrides: list[str] = (), **fields) -> Path:
    (directory / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"stable": STABLE, "decay": decay},
        "schedule": {"warmup_steps": 2}, "batch": {"tokens_per_step": 512, "seq_len": 32, "micro_batch_size": 16}}))
    spec = directory / "schedules.yaml"
    spec.write_text(yaml.safe_dump({"base": {"config": "recipe.yaml", "overrides": list(overrides)},
                                    "shape": {"head_dim": 16}, "sizes": [{"name": "w16", "width": 16, "depth": 1}],
                                    "tokens": [8], "decay_fractions": [0.1], "workers": 0, **fields}))
    return spec


def test_arms_on_different_data_are_refused_in_one_line_before_anything_is_written(tmp_path):
    spec = write_case(tmp_path, decay={"code": 0.2, "prose": 0.8})
    with pytest.raises(MiniCPMError) as e:
        plan_comparison(load_campaign_spec(spec, "schedules"), tmp_path / "out")
    message = str(e.value)
    assert message.startswith(f"{spec}: data.decay: ") and "\n" not in message
    assert "allow_different_data: true" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("decay, overrides, fields", [
    (None, [], {}),                                           # one mixture: no decay mix at all
    (STABLE, [], {}),                                         # a decay mix equal to the stable one
    ({"code": 0.2, "prose": 0.8}, ["data.decay=null"], {}),   # the recipe's decay mix switched off by the spec
    ({"code": 0.2, "prose": 0.8}, [], {"allow_different_data": True}),  # told explicitly
])
def test_same_data_or_an_explicit_permission_plans_every_arm(tmp_path, decay, overrides, fields):
    spec = write_case(tmp_path, decay=decay, overrides=overrides, **fields)
    jobs, entries = plan_comparison(load_campaign_spec(spec, "schedules"), tmp_path / "out")
    assert [e.schedule for e in entries] == ["cosine", "constant", "wsd-10%"]
    assert (tmp_path / "out" / "recipe.yaml").is_file()


def test_allow_different_data_must_be_a_boolean(tmp_path):
    spec = write_case(tmp_path, decay=None, allow_different_data="yes")
    with pytest.raises(MiniCPMError, match="allow_different_data"):
        load_campaign_spec(spec, "schedules")


def test_the_shipped_demo_is_a_fair_comparison():
    spec = load_campaign_spec(Path(minicpm.__file__).parent / "configs" / "schedules-demo.yaml", "schedules")
    cfg = recipe_config(spec)
    assert cfg.data.decay is None and cfg.data.stable  # one mixture in every arm
    assert not spec.allow_different_data
    check_same_data(spec, cfg)
