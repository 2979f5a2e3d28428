"""MiniCPM-MoE layers: routing order, dropless dispatch, the stacked experts against the per-expert layer they
replaced and the official per-expert layout, the pooled balance loss as transformers computes it, the router z-loss, the
statistics the layers report, μP roles and the preset's parameter counts. (The per-layer balance loss, the default:
tests/model/test_balance_loss.py.)"""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from minicpm.errors import MiniCPMError
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig, preset
from minicpm.model.moe import grouped_mm_serves, per_expert_state, pool_router_losses, stacked_state
from minicpm.optim.mup import param_groups
from minicpm.train.objectives import add_aux_losses



def moe_config(**overrides):
    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    return ModelConfig(**(fields | overrides))


def expert(moe, e, x):
    """Expert e of an MoE layer from its official matrices: w2(silu(w1 x) · w3 x)."""
    official = per_expert_state({"mlp.experts.gate_up": moe.experts.gate_up, "mlp.experts.down": moe.experts.down})
    w1, w2, w3 = (official[f"mlp.experts.{e}.{name}.weight"] for name in ("w1", "w2", "w3"))
    return w2 @ (torch.nn.functional.silu(w1 @ x) * (w3 @ x))


def router_logits(model, ids):
    """Each MoE layer's router logits (tokens, E), recorded by hooks on the gates."""
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: logits.append(out.detach()))
             for layer in model.model.layers]
    aux = {}
    try:
        model.hidden_states(ids, aux_losses=aux)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, aux


def test_moe_output_is_the_renormalised_top_k_mix_of_its_experts():
    model = build_model(moe_config(), seed=1)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 5, 64)
    out = moe(x)
    tokens = x.reshape(-1, 64)
    probs = torch.softmax(moe.gate(tokens).float(), dim=-1)
    expected = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):  # one token at a time, straight from the formula
        top = probs[t].topk(2)
        for w, e in zip(top.values / top.values.sum(), top.indices):
            expected[t] += w * expert(moe, int(e), tokens[t])
    torch.testing.assert_close(out.reshape(-1, 64), expected, atol=1e-5, rtol=1e-5)


def test_pooled_balance_loss_is_transformers_mixtral_loss_pooled_over_layers():
    model = build_model(moe_config(num_hidden_layers=3), seed=2)
    model.balance_form = "pooled"
    logits, aux = router_logits(model, torch.randint(0, 96, (2, 12)))
    expected = load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2)
    assert aux["load_balance"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_router_that_sends_everything_to_one_expert_pays_more_than_a_uniform_one():
    moe = build_model(moe_config(), seed=3).model.layers[0].mlp
    x = torch.rand(2, 16, 64) + 0.1  # positive inputs: a positive gate row wins every token

    def balance_loss():
        aux = {}
        moe(x, aux)
        pool_router_losses(aux)
        return float(aux["load_balance"])

    with torch.no_grad():
        moe.gate.weight.zero_()  # uniform probabilities: E·Σ f·(1/E) = k
        uniform = balance_loss()
        moe.gate.weight[0] = 1.0  # expert 0 takes every token with probability ≈ 1: E·1·1 = E
        collapsed = balance_loss()
    assert uniform == pytest.approx(2.0, rel=1e-6)
    assert collapsed == pytest.approx(4.0, rel=1e-3)


def test_router_z_loss_is_reported_only_when_asked_and_is_the_mean_squared_logsumexp():
    ids = torch.randint(0, 96, (2, 8))
    assert "router_z" not in router_logits(build_model(moe_config(), seed=4), ids)[1]
    model = build_model(moe_config(router_z_loss=True), seed=4)
    logits, aux = router_logits(model, ids)
    expected = sum(torch.logsumexp(g.float(), -1).pow(2).mean() for g in logits) / len(logits)
    assert aux["router_z"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_layer_statistics_reach_the_metrics_and_stay_out_of_the_loss():
    model = build_model(moe_config(), seed=5)
    _, aux = router_logits(model, torch.randint(0, 96, (2, 8)))
    metrics = {}
    loss = add_aux_losses(torch.tensor(0.0), metrics, aux, {"load_balance": 0.5}, targets=10)
    assert float(loss) == pytest.approx(0.5 * float(aux["load_balance"]) * 10, rel=1e-6)
    assert set(aux) - set(f"stat/{name}" for name in metrics) == {"load_balance"}
    for layer in (0, 1):
        loads = [float(metrics[f"moe/layer{layer}/load_expert{e}"][0]) / 10 for e in range(4)]
        assert sum(loads) == pytest.approx(1.0)
        assert float(metrics[f"moe/layer{layer}/load_max"][0]) / 10 == pytest.approx(max(loads))
        assert float(metrics[f"moe/layer{layer}/load_min"][0]) / 10 == pytest.approx(min(loads))
        assert 0 < float(metrics[f"moe/layer{layer}/router_entropy"][0]) / 10 <= math.log(4)
    per_layer = {stat: [float(metrics[f"moe/layer{i}/{stat}"][0]) for i in (0, 1)]
                 for stat in ("load_max", "load_min", "router_entropy")}
    assert float(metrics["moe/load_max"][0]) == pytest.approx(max(per_layer["load_max"]))
    assert float(metrics["moe/load_min"][0]) == pytest.approx(min(per_layer["load_min"]))
    assert float(metrics["moe/router_entropy"][0]) == pytest.approx(sum(per_layer["router_entropy"]) / 2)


def test_jitter_acts_in_training_only():
    model = build_model(moe_config(router_jitter_noise=0.5), seed=6)
    ids = torch.randint(0, 96, (1, 8))
    model.eval()
    assert torch.equal(model(ids), model(ids))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(ids), model(ids))


def test_mup_roles_of_the_moe_router_and_experts():
    config = moe_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=4)  # m = 0.5
    model = build_model(config, seed=7)
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, weight_decay=0.1)}
    gate = model.model.layers[0].mlp.gate.weight
    experts = model.model.layers[0].mlp.experts
    assert any(p is gate for p in groups["router"]["params"]) and groups["router"]["lr"] == pytest.approx(0.02)
    for stack in (experts.gate_up, experts.down):
        assert any(p is stack for p in groups["matrices"]["params"]) and groups["matrices"]["lr"] == pytest.approx(0.02)
    big = build_model(moe_config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16,
                                 intermediate_size=256), seed=7)  # m = 4: hidden std 0.05, router std 0.1
    assert big.model.layers[0].mlp.gate.weight.std().item() == pytest.approx(0.1, rel=0.05)
    assert big.model.layers[0].mlp.experts.gate_up.std().item() == pytest.approx(0.05, rel=0.05)


def test_moe_preset_counts_are_the_papers():
    config = preset("minicpm-moe-8x2b")
    # paper section 6 counts without the embedding: 13.6B total, 4B active
    assert config.non_embedding_params() == 13_590_468_864
    assert config.active_non_embedding_params() == 4_035_320_064


@pytest.mark.parametrize("fields, message", [
    (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(num_experts=-1), "num_experts"),
    (dict(router_jitter_noise=1.5), "router_jitter_noise"),
    (dict(router_z_loss="yes"), "router_z_loss"),
])
def test_bad_moe_configs_are_one_line_errors(fields, message):
    with pytest.raises(MiniCPMError, match=message) as error:
        moe_config(**fields)
    assert "\n" not in str(error.value)


class PerExpertMoE(torch.nn.Module):
    """The layer the stacked experts replaced, as it was: one nn.Linear per expert matrix (official names), tokens
    sorted by expert and each expert run on its own rows in a loop, the weighted rows added back with index_add_."""

    def __init__(self, moe):
        super().__init__()
        self.gate, self.top_k, self.route = moe.gate, moe.top_k, moe.route
        E, two_i, d = moe.experts.gate_up.shape
        self.experts = torch.nn.ModuleList(torch.nn.ModuleDict(
            {name: torch.nn.Linear(*shape, bias=False) for name, shape in
             (("w1", (d, two_i // 2)), ("w2", (two_i // 2, d)), ("w3", (d, two_i // 2)))}) for _ in range(E))
        official = per_expert_state({"mlp.experts.gate_up": moe.experts.gate_up, "mlp.experts.down": moe.experts.down})
        with torch.no_grad():
            for key, tensor in official.items():
                self.get_parameter(key.removeprefix("mlp.")).copy_(tensor)

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        _, _, weights, chosen = self.route(x)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k
        parts = x[token].split(torch.bincount(flat, minlength=len(self.experts)).tolist())
        rows = torch.cat([e["w2"](torch.nn.functional.silu(e["w1"](part)) * e["w3"](part))
                          for e, part in zip(self.experts, parts)])
        rows = (rows.float() * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, rows).view(shape)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_stacked_experts_equal_the_per_expert_layer_in_outputs_and_gradients(grouped):
    if grouped and not grouped_mm_serves(torch.device("cpu"), torch.float32, 64, 96):
        pytest.skip("this torch has no grouped matmul for CPU fp32")
    moe = build_model(moe_config(), seed=8).model.layers[0].mlp
    moe.experts.grouped_mm = grouped
    reference = PerExpertMoE(moe)
    x = torch.randn(2, 16, 64, requires_grad=True)
    probe = torch.linspace(-1, 1, x.numel()).view_as(x)
    results = []
    for layer in (moe, reference):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        (out * probe).sum().backward()
        grads = {"mlp.experts.gate_up": moe.experts.gate_up.grad, "mlp.experts.down": moe.experts.down.grad}
        if layer is reference:  # the per-expert matrices' gradients under the official keys
            grads = {f"mlp.experts.{name}": p.grad for name, p in reference.experts.named_parameters()}
        else:
            grads = per_expert_state(grads)
        results.append({"out": out.detach(), "x": x.grad.clone(), "gate": moe.gate.weight.grad.clone(), **grads})
    ours, want = results
    assert set(ours) == set(want)
    assert all((ours[k] != 0).any() for k in ("out", "x", "gate", "mlp.experts.0.w1.weight"))
    for key in want:  # fp32 rounding only: within 1e-6 of each tensor's scale (the sums run in another order)
        error = (ours[key] - want[key]).abs().max() / want[key].abs().max()
        assert error <= 1e-6, f"{key}: relative difference {error:.1e}"


def test_official_layout_round_trip_is_bit_exact(tmp_path):
    from minicpm.interop.hf import load_model, official_state, read_checkpoint, save_model

    model = build_model(moe_config(), seed=10)
    state = model.state_dict()
    official = per_expert_state(state)
    assert {k for k in official if ".experts." in k} == {
        f"model.layers.{i}.mlp.experts.{e}.{m}.weight" for i in (0, 1) for e in range(4) for m in ("w1", "w2", "w3")}
    assert official["model.layers.1.mlp.experts.2.w3.weight"].shape == (96, 64)
    back = stacked_state(official)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    _, saved = read_checkpoint(save_model(model, tmp_path / "moe"))
    assert set(saved) == set(official) and all(torch.equal(saved[k], official[k]) for k in official)
    loaded = load_model(tmp_path / "moe").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert list(official_state(model)) == list(official)


def test_a_missing_expert_matrix_is_a_one_line_error():
    official = per_expert_state(build_model(moe_config(), seed=11).state_dict())
    del official["model.layers.0.mlp.experts.3.w2.weight"]
    with pytest.raises(MiniCPMError, match="missing tensor model.layers.0.mlp.experts.3.w2.weight") as error:
        stacked_state(official)
    assert "\n" not in str(error.value)


def test_step_balance_sums_the_processes_counts_inside_the_forward_into_the_whole_batchs_loss():
    from minicpm.model.moe import StepBalance

    model = build_model(moe_config(), seed=9)
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    whole = router_logits(model, ids)[1]["load_balance"]  # one process, one forward: Mixtral's loss of the batch
    halves = (ids[:2], ids[2:])
    counts = []
    for half in halves:  # what each process counts of its own tokens
        model.step_balance = StepBalance()
        model.step_balance.counting = True
        model.hidden_states(half, aux_losses={})
        counts.append(model.step_balance.counts)
    losses = []
    for rank, half in enumerate(halves):  # "process" rank, whose all-reduce adds the other's counts
        model.step_balance = StepBalance(all_reduce=lambda t, other=counts[1 - rank]: t.add_(other))
        aux = {}
        model.hidden_states(half, aux_losses=aux)
        losses.append(aux["load_balance"])
    model.step_balance = None
    assert float(sum(losses) / 2) == pytest.approx(float(whole), rel=1e-6)
    alone = [router_logits(model, half)[1]["load_balance"] for half in halves]  # without the all-reduce: differs
    assert float(sum(alone) / 2) != pytest.approx(float(whole), rel=1e-3)
