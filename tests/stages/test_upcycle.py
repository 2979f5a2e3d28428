"""Sparse upcycling: a dense checkpoint → an MoE one whose logits at step 0 are the dense model's; the remedies for
the flat start; the command line; and training on from the upcycled weights (a weights-only start)."""

import pytest
import torch
from train_helpers import PatternData, metrics_without_timing, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import load_model, read_checkpoint, save_model
from minicpm.stages.upcycle import upcycle
from minicpm.model.build import build_model
from minicpm.model.config import preset
from minicpm.train.loop import train



@pytest.fixture
def dense(tmp_path):
    model = build_model(preset("tiny"), seed=11)
    save_model(model, tmp_path / "dense")
    return model, tmp_path / "dense"


def test_upcycled_logits_equal_the_dense_logits_at_step_0(dense, tmp_path):
    model, path = dense
    out = upcycle(path, tmp_path / "moe", experts=4, top_k=2, seed=1)
    moe = load_model(out)
    assert moe.config.num_experts == 4 and moe.config.num_experts_per_tok == 2
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (moe(ids) - model(ids)).abs().max().item()
    assert error < 1e-5
    # the routers are fresh N(0, 0.1²), not copies of anything
    assert moe.model.layers[0].mlp.gate.weight.std().item() == pytest.approx(0.1, rel=0.2)


def test_upcycled_experts_are_exact_copies_and_the_layout_is_the_official_one(dense, tmp_path):
    _, path = dense
    _, state = read_checkpoint(upcycle(path, tmp_path / "moe", experts=3, top_k=1))
    _, dense_state = read_checkpoint(path)
    for e in range(3):
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            assert torch.equal(state[f"model.layers.1.mlp.experts.{e}.{ours}.weight"],
                               dense_state[f"model.layers.1.mlp.{theirs}.weight"])
    assert state["model.layers.1.mlp.gate.weight"].shape == (3, 64)
    assert not any("gate_proj" in k for k in state)


def test_drop_upcycling_redraws_the_asked_fraction_of_units_independently_per_expert(dense, tmp_path):
    _, path = dense
    _, state = read_checkpoint(upcycle(path, tmp_path / "moe", experts=2, top_k=1, reinit_fraction=0.25))
    _, dense_state = read_checkpoint(path)
    w1 = dense_state["model.layers.0.mlp.gate_proj.weight"]
    w2 = dense_state["model.layers.0.mlp.down_proj.weight"]
    redrawn = []
    for e in range(2):
        rows = (state[f"model.layers.0.mlp.experts.{e}.w1.weight"] != w1).any(dim=1)
        columns = (state[f"model.layers.0.mlp.experts.{e}.w2.weight"] != w2).any(dim=0)
        assert int(rows.sum()) == 40  # 0.25 × 160 intermediate units
        assert torch.equal(rows, columns)  # a unit's input rows and output column together
        redrawn.append(rows)
    assert not torch.equal(*redrawn)


def test_noise_makes_the_experts_differ(dense, tmp_path):
    _, path = dense
    _, state = read_checkpoint(upcycle(path, tmp_path / "moe", experts=2, top_k=1, noise=0.01))
    a, b = (state[f"model.layers.0.mlp.experts.{e}.w1.weight"] for e in range(2))
    relative = ((a - b).std() / a.std()).item()
    assert relative == pytest.approx(0.01 * 2 ** 0.5, rel=0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts=2, top_k=3), "--top-k must be an integer in 1..2"),
    (dict(experts=0), "--experts must be an integer >= 1"),
    (dict(reinit_fraction=1.5), "--reinit-fraction"),
])
def test_bad_upcycle_arguments_are_one_line_errors(dense, tmp_path, kwargs, message):
    with pytest.raises(MiniCPMError, match=message):
        upcycle(dense[1], tmp_path / "moe", **kwargs)


def test_an_moe_checkpoint_with_a_missing_expert_tensor_is_a_one_line_error_of_the_cli(dense, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    moe = upcycle(dense[1], tmp_path / "moe", experts=2, top_k=1)
    tensors = load_file(moe / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.1.w3.weight"]
    save_file(tensors, moe / "model.safetensors")
    result = cli("export", moe, tmp_path / "x", "--to", "minicpm")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing tensor model.layers.1.mlp.experts.1.w3.weight" in result.stderr


def test_upcycle_command_then_training_continues_and_logs_the_router(dense, tmp_path, cli):
    _, path = dense
    result = cli("upcycle", path, "--experts", "4", "--top-k", "2", "--out", tmp_path / "moe")
    assert result.returncode == 0, result.stderr
    bad = cli("upcycle", path, "--experts", "2", "--top-k", "3", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1

    cfg = tiny_config(tmp_path / "run", "model.num_experts=4", "model.num_experts_per_tok=2",
                      f"run.init_weights_from={tmp_path / 'moe'}", "run.dtype=fp32", "schedule.total_steps=4",
                      "schedule.decay_start=3", "run.log_every=1", "run.checkpoint_every=0")
    train(cfg, data=PatternData(cfg.schedule.resolve()))
    records = [r for r in metrics_without_timing(tmp_path / "run") if "loss" in r]
    assert len(records) == 4
    for record in records:
        assert record["aux/load_balance"] >= 2.0 - 1e-6  # k under perfect balance, more otherwise
        loads = [record[f"moe/layer1/load_expert{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0)
        # max and min are taken per micro-batch, then averaged: a mean of maxima is at least the max of means
        assert record["moe/layer1/load_max"] >= max(loads) - 1e-9
        assert record["moe/layer1/load_min"] <= min(loads) + 1e-9
        assert 0 < record["moe/layer0/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
