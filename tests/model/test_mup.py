"""μP: initialisation, parameter groups, and the coordinate check across widths 64..512."""

import math

import pytest
import torch

from minicpm.model.config import ModelConfig
from minicpm.model.transformer import MiniCPM
from minicpm.model import build
from minicpm.optim import mup
from minicpm.model.build import build_model, init_weights
from minicpm.optim.mup import coord_check, param_groups, width_spread

WIDTHS = [64, 128, 256, 512]
STEPS = 4



def config(width: int, **overrides) -> ModelConfig:
    fields = dict(vocab_size=1000, hidden_size=width, intermediate_size=width * 5 // 2, num_hidden_layers=2,
                  num_attention_heads=width // 32, num_key_value_heads=width // 32, dim_model_base=64,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize("embedding_in_2d_group", [True, False])
def test_init_std_is_initializer_range_over_sqrt_width_multiplier(embedding_in_2d_group):
    model = build_model(config(512), seed=3, embedding_in_2d_group=embedding_in_2d_group)  # m = 8
    hidden_std = 0.1 / math.sqrt(8)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name
            continue
        vocab = name in ("model.embed_tokens.weight", "lm_head.weight")
        expected = 0.1 if vocab and not embedding_in_2d_group else hidden_std
        assert p.std().item() == pytest.approx(expected, rel=0.03), name
        assert abs(p.mean().item()) < 0.01 * expected * 10, name


def test_build_model_is_seeded_and_materialises_from_meta():
    a, b = build_model(config(64), seed=1), build_model(config(64), seed=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.model.embed_tokens.weight, build_model(config(64), seed=2).model.embed_tokens.weight)
    # the whole μP path runs without memory on the meta device, even for the 2.4B
    from minicpm.model.config import preset

    big = build_model(preset("minicpm-2.4b"), device="meta", dtype=torch.bfloat16)
    assert big.model.embed_tokens.weight.is_meta and big.head_weight.dtype == torch.bfloat16


def test_init_weights_overwrites_garbage_after_to_empty():
    with torch.device("meta"):
        model = MiniCPM(config(64))
    model.to_empty(device="cpu")
    init_weights(model, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("embedding_in_2d_group", [True, False])
def test_param_groups_scale_2d_learning_rates_and_decay_only_matrices(embedding_in_2d_group):
    model = build_model(config(256), embedding_in_2d_group=embedding_in_2d_group)  # m = 4
    groups = param_groups(model, lr=0.01, weight_decay=0.1, embedding_in_2d_group=embedding_in_2d_group)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        assert g["lr"] == pytest.approx(0.01 * g["lr_scale"])
        if p.ndim == 1:
            assert (g["lr_scale"], g["weight_decay"]) == (1.0, 0.0), name
        elif name in ("model.embed_tokens.weight", "lm_head.weight") and not embedding_in_2d_group:
            assert (g["lr_scale"], g["weight_decay"]) == (1.0, 0.1), name
        else:
            assert (g["lr_scale"], g["weight_decay"]) == (0.25, 0.1), name
    torch.optim.AdamW(groups)  # torch accepts the groups with their extra keys


# ---------------------------------------------------------------- coordinate check

def width_violations(result) -> list[str]:
    """Where the check fails: the residual stream at any step, or the logits after the Adam steps, varying by 2x or
    more across widths (at init μP logits may shrink with width; microsoft/mup's README names that exception)."""
    bad = [f"layers.{i} at t={t}: {width_spread(result, f'layers.{i}', t):.2f}x"
           for i in range(2) for t in range(STEPS + 1) if width_spread(result, f"layers.{i}", t) >= 2.0]
    if width_spread(result, "logits", -1) >= 2.0:
        bad.append(f"logits at t={STEPS}: {width_spread(result, 'logits', -1):.2f}x")
    return bad


def run_check(**kwargs):
    return coord_check(WIDTHS, steps=STEPS, **{"mup": True, "embedding_in_2d_group": False, **kwargs})


@pytest.mark.slow
def test_coord_check_is_flat_under_mup_and_drifts_under_standard_parametrisation():
    mu = run_check()
    assert set(mu) == set(WIDTHS) and len(mu[64]["logits"]) == STEPS + 1
    assert width_violations(mu) == []
    standard = run_check(mup=False)
    assert width_spread(standard, "layers.1", -1) > 4.0


@pytest.mark.slow
def test_coord_check_fails_when_the_2d_learning_rate_is_not_divided_by_width(monkeypatch):
    def unscaled(model, **kwargs):
        groups = param_groups(model, **kwargs)
        for g in groups:
            g["lr"] = kwargs["lr"]
        return groups

    monkeypatch.setattr(mup, "param_groups", unscaled)
    assert width_violations(run_check())


def test_coord_check_fails_without_the_logit_divisor(monkeypatch):
    original = MiniCPM.hidden_states
    monkeypatch.setattr(MiniCPM, "hidden_states",
                        lambda self, *a, **k: original(self, *a, **k) * self.config.width_multiplier)
    assert width_violations(run_check())


def test_coord_check_fails_without_the_init_scaling(monkeypatch):
    def unscaled_init(model, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, model.config.initializer_range) if p.ndim == 2 else p.fill_(1.0)
        return model

    monkeypatch.setattr(build, "init_weights", unscaled_init)
    assert width_violations(run_check())


def test_literal_table7_reading_shrinks_embedding_and_logits_with_width():
    """The paper's literal reading (the tied embedding in the 2-D group) is not width-stable at the vocabulary
    ends: the embedding output shrinks like 1/sqrt(m) and the logits like 1/m. Kept as a switch (DESIGN §3)."""
    literal = run_check(embedding_in_2d_group=True)
    assert width_spread(literal, "embedding") > 2.0 and width_spread(literal, "logits") > 4.0
    assert literal[512]["logits"][-1] < literal[64]["logits"][-1]
