"""The width -> shape rule (model/shapes.py): paper Table 8's heads and d_ff, a family's GQA share, the depth rule,
and every caller (presets, campaign sizes, planner, wind tunnel, coordinate check) shaping by it."""

import dataclasses

import pytest
import yaml

from minicpm.errors import MiniCPMError
from minicpm.model.config import PRESETS, ModelConfig, preset
from minicpm.model.shapes import (TABLE8, DepthRule, WidthRule, family_of, fit_depth_rule, snap_shape,
                                  width_rule_of)
from minicpm.optim.mup import coord_check_config
from minicpm.scaling.spec import load_campaign_spec
from minicpm.windtunnel.lr_transfer import width_overrides


def test_table8_shapes_heads_of_64_and_d_ff_two_and_a_half_times_the_width():
    assert WidthRule().fields(512, 12) == {"hidden_size": 512, "intermediate_size": 1280, "num_hidden_layers": 12,
                                           "num_attention_heads": 8, "num_key_value_heads": 8}
    assert list(WidthRule().fields(320)) == ["hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads"]  # no depth given, none set
    assert WidthRule(head_dim=16).overrides(128) == ["model.hidden_size=128", "model.intermediate_size=320",
                                                     "model.num_attention_heads=8", "model.num_key_value_heads=8"]


def test_the_proxy_presets_are_table8_under_the_rule():
    proxies = sorted((p.hidden_size, p.num_hidden_layers) for name, p in PRESETS.items() if name.startswith("proxy"))
    assert proxies == sorted(TABLE8)
    for width, depth in TABLE8:
        p = next(p for p in PRESETS.values() if p.hidden_size == width and p.num_hidden_layers == depth)
        assert {k: getattr(p, k) for k in WidthRule().fields(width, depth)} == WidthRule().fields(width, depth)
        assert p.head_dim == 64 and p.intermediate_size == width * 5 // 2


def test_a_family_keeps_its_share_of_key_value_heads_and_falls_back_to_mha():
    gqa = WidthRule(head_dim=16, kv_groups=2)
    assert (gqa.heads(64), gqa.key_value_heads(64)) == (4, 2)
    assert (gqa.heads(48), gqa.key_value_heads(48)) == (3, 3)  # 2 does not divide 3 heads: multi-head attention
    assert WidthRule(head_dim=16, kv_heads=2).key_value_heads(128) == 2  # a fixed count at every width
    assert width_rule_of(preset("tiny")) == gqa
    assert width_rule_of(preset("minicpm-1.2b")) == WidthRule(head_dim=64, ffn_ratio=2.5, kv_groups=3)


def test_widths_compared_across_are_distinct_sorted_multiples_of_the_head_size():
    assert WidthRule(head_dim=16).widths_to_compare([64, 32, 64]) == [32, 64]
    with pytest.raises(MiniCPMError, match=r"--widths: give at least two widths, got \[64\]"):
        WidthRule(head_dim=16).widths_to_compare([64, 64])
    with pytest.raises(MiniCPMError, match="--widths: 40 is not a positive multiple of the head size 16"):
        WidthRule(head_dim=16).widths_to_compare([32, 40])


def test_the_depth_rule_is_a_power_of_the_width():
    rule = fit_depth_rule([(w, 0.5 * w ** 0.6) for w in (100, 200, 400, 800)])
    assert rule.c == pytest.approx(0.5) and rule.k == pytest.approx(0.6)
    assert DepthRule(0.5, 0.6).depth(400) == round(0.5 * 400 ** 0.6)
    table8 = fit_depth_rule(TABLE8)
    assert [table8.depth(w) for w, _ in TABLE8] == [d for _, d in TABLE8]


def test_a_family_is_its_largest_member_with_a_depth_fitted_on_its_widths():
    tiny = preset("tiny")
    members = [dataclasses.replace(tiny, **WidthRule(16, kv_groups=2).fields(w, d)) for w, d in ((32, 2), (128, 5))]
    family = family_of(members)
    assert family.base == members[1] and family.width_rule == WidthRule(16, 2.5, 2)
    assert family.rule_source == "the campaign's sizes" and family.depth(32) == 2 and family.depth(128) == 5
    assert family.shape(64) == dataclasses.replace(members[1], **family.width_rule.fields(64, family.depth(64)))
    assert family_of(members[:1]).rule_source == "paper Table 8"
    # the snapped shape is the family's width whose parameters lie nearest the target, in log
    target = family.shape(96).non_embedding_params() * 1.05
    assert snap_shape(family, target) == family.shape(96)


def test_every_caller_shapes_by_the_rule(tmp_path):
    rule = WidthRule(head_dim=16)
    config = coord_check_config(128, mup=True, base_width=64, layers=3, head_dim=16)
    assert {k: getattr(config, k) for k in rule.fields(128, 3)} == rule.fields(128, 3)
    assert width_overrides(128, head_dim=16, base_width=64, parametrisation="mup") == [
        *rule.overrides(128), "model.dim_model_base=64"]

    (tmp_path / "recipe.yaml").write_text("model: {preset: tiny}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": {"config": "recipe.yaml"}, "shape": {"head_dim": 16, "kv_heads": 2},
                                    "sizes": ["proxy-9m", {"name": "w64", "width": 64, "depth": 3}],
                                    "decay_points": [10, 20]}))
    sizes = load_campaign_spec(spec).sizes
    assert sizes[0].shape == WidthRule().fields(320, 8) and sizes[0].preset == "proxy-9m"
    assert sizes[1].shape == WidthRule(head_dim=16, kv_heads=2).fields(64, 3)
    assert isinstance(ModelConfig(**sizes[1].shape), ModelConfig)
