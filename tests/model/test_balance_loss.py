"""The MoE balance loss per layer, summed (Switch's, Fedus et al. 2021: per layer E·Σ_e f_e·P_e; the default), against
a few lines computing it from each layer's router logits: its value, its gradient, and that each router gets its own
layer's full gradient (pooling over layers, transformers' Mixtral form, lets layers' imbalances cancel)."""

from __future__ import annotations

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig
from minicpm.model.moe import balance_loss

E, K, LAYERS = 4, 2, 3


def model(seed: int = 0):
    return build_model(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=E,
                                   num_experts_per_tok=K), seed=seed)


def forward_with_logits(net, ids):
    """The model's aux losses and each layer's router logits, kept in the graph."""
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: logits.append(out)) for layer in net.model.layers]
    aux = {}
    try:
        net.hidden_states(ids, aux_losses=aux)
    finally:
        for hook in hooks:
            hook.remove()
    return aux, logits


def switch_loss(g: torch.Tensor) -> torch.Tensor:
    """One layer's E·Σ_e f_e·P_e from its router logits (tokens, E): f the share of top-k picks, P the mean prob."""
    p = torch.softmax(g.float(), dim=-1)
    picks = torch.nn.functional.one_hot(p.topk(K, dim=-1).indices, E).sum(dim=1).float()  # (tokens, E)
    return E * (picks.mean(dim=0) * p.mean(dim=0)).sum()


IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))


def test_per_layer_balance_loss_is_the_sum_of_each_layers_switch_loss():
    net = model()
    assert net.balance_form == "per_layer"  # the default
    aux, logits = forward_with_logits(net, IDS)
    expected = sum(switch_loss(g) for g in logits)
    assert aux["load_balance"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_per_layer_balance_loss_gradient_matches_the_independent_formula():
    net = model(seed=3)
    aux, logits = forward_with_logits(net, IDS)
    gates = [layer.mlp.gate.weight for layer in net.model.layers]
    ours = torch.autograd.grad(aux["load_balance"], gates, retain_graph=True)
    theirs = torch.autograd.grad(sum(switch_loss(g) for g in logits), gates)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # each router is pushed by its own layer's loss at full strength: the gradient of the last gate is the gradient
    # of the last layer's Switch loss alone (nothing after it routes), not a 1/L share of a pooled one
    aux, logits = forward_with_logits(net, IDS)
    own = torch.autograd.grad(switch_loss(logits[-1]), gates[-1], retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(aux["load_balance"], gates[-1])[0], own, rtol=1e-5, atol=1e-8)


def test_pooled_form_lets_opposite_imbalances_cancel_where_per_layer_does_not():
    from minicpm.model.moe import _Routing

    tokens = 8
    lopsided = [torch.tensor([8.0, 8.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 8.0, 8.0])]  # k = 2 picks per token
    probs = [torch.tensor([4.0, 4.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0, 4.0])]  # summed over the 8 tokens
    routing = [_Routing(a, p, tokens, None, torch.tensor(0.0)) for a, p in zip(lopsided, probs)]
    per_layer = balance_loss(routing, form="per_layer")
    pooled = balance_loss(routing, form="pooled")
    assert float(per_layer) == pytest.approx(2 * E * (1.0 * 0.5 + 1.0 * 0.5))  # each layer collapsed onto 2 experts
    assert float(pooled) == pytest.approx(K)  # pooled over layers it looks perfectly balanced: the uniform value
    with pytest.raises(MiniCPMError, match="balance loss form 'mean'"):
        balance_loss(routing, form="mean")


def test_the_train_config_chooses_the_form():
    from minicpm.train.config import load_config

    assert load_config(None, []).objective.balance_loss == "per_layer"
    assert load_config(None, ["objective.balance_loss=pooled"]).objective.balance_loss == "pooled"
    with pytest.raises(MiniCPMError, match="objective.balance_loss: expected per_layer or pooled"):
        load_config(None, ["objective.balance_loss=mean"])
