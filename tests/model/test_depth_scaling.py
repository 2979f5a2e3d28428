"""model.depth_scaling: MiniCPM's scale_depth/√L against CompleteP's L_base/L (Dey et al. 2025), checked by the
coordinate check across depth, and the config/optimizer rules that go with it."""

from __future__ import annotations

import math

import pytest

from minicpm.errors import MiniCPMError
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig, preset
from minicpm.optim.mup import depth_coord_check, depth_spread, param_groups

DEPTHS = (2, 4, 8, 16)


@pytest.fixture(scope="module")
def checks() -> dict[str, dict[int, dict[str, float]]]:
    return {kind: depth_coord_check(DEPTHS, steps=3, depth_scaling=kind, width=32, seq_len=16, batch_size=2)
            for kind in ("minicpm", "completep")}


def test_completep_keeps_the_blocks_update_flat_in_depth(checks):
    # measured: spread 1.07 (0.60, 0.60, 0.58, 0.56); the update of L correlated branches × L_base/L stays O(1)
    assert depth_spread(checks["completep"], "update") < 1.25


def test_minicpm_update_grows_with_depth_while_its_init_stays_flat(checks):
    # measured: update 0.59, 0.78, 0.95, 1.05 (coherent sum × 1/√L grows like √L until the norms saturate it);
    # init spread 1.05 (independent branches × 1/√L add in quadrature)
    updates = [checks["minicpm"][d]["update"] for d in DEPTHS]
    assert updates == sorted(updates) and updates[-1] / updates[0] > 1.5
    assert depth_spread(checks["minicpm"], "init") < 1.15


def test_completep_init_share_shrinks_like_one_over_root_depth(checks):
    init = checks["completep"]
    ratio = init[16]["init"] / init[2]["init"]
    assert ratio == pytest.approx(1 / math.sqrt(8), rel=0.2)  # measured 0.348 against 0.354


def test_residual_multiplier_and_optimizer_rules():
    config = ModelConfig(**{**preset("tiny").__dict__, "num_hidden_layers": 8, "depth_scaling": "completep",
                            "depth_base": 2})
    assert config.residual_scale == pytest.approx(2 / 8)
    model = build_model(config)
    assert all(layer.residual_scale == pytest.approx(0.25) for layer in model.model.layers)
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, weight_decay=0.1, eps=1e-8)}
    reference = {g["name"]: g for g in param_groups(build_model(preset("tiny")), lr=0.01, weight_decay=0.1, eps=1e-8)}
    for name, group in groups.items():
        assert group["eps"] == pytest.approx(1e-8 / 4), name  # (L/L_base)^-1
        assert group["lr_scale"] == pytest.approx(reference[name]["lr_scale"]), name  # (L/L_base)^(α-1) = 1
        assert reference[name]["eps"] == 1e-8, name
    assert preset("tiny").residual_scale == pytest.approx(1.4 / math.sqrt(2))


def test_hf_config_round_trip():
    official = preset("minicpm-2.4b").to_hf_dict()
    assert "depth_scaling" not in official and "depth_base" not in official
    assert ModelConfig.from_hf_dict(official) == preset("minicpm-2.4b")
    deep = ModelConfig(**{**preset("tiny").__dict__, "depth_scaling": "completep", "depth_base": 1})
    saved = deep.to_hf_dict()
    assert (saved["depth_scaling"], saved["depth_base"]) == ("completep", 1)
    assert ModelConfig.from_hf_dict(saved) == deep


@pytest.mark.parametrize("fields, message", [
    ({"depth_scaling": "completep"}, "depth_scaling completep needs depth_base"),
    ({"depth_scaling": "muP-depth"}, "depth_scaling must be one of minicpm, completep"),
    ({"depth_base": 4}, "depth_base 4 is only for depth_scaling completep"),
])
def test_bad_depth_fields_are_one_line_errors(fields, message):
    with pytest.raises(MiniCPMError, match=message):
        ModelConfig(**{**preset("tiny").__dict__, **fields})
