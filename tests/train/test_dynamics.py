"""Decay dynamics (paper §4.4, run.dynamics): the logged cosine of consecutive gradients, update norm, D1, D2 and
curvature equal an independent computation from the gradients and weights of a tiny model; metrics.jsonl carries
them (averaged over the steps that have them) and `minicpm report` plots them."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from train_helpers import PatternData, tiny_config

from minicpm.train.loop import Trainer, train

# runs that leave run.dtype at auto: CI runs them a second time as a CPU with native bf16 kernels would
# (MINICPM_AUTO_DTYPE=bf16 python -m pytest -m auto_dtype)
pytestmark = pytest.mark.auto_dtype



def reference_gradient(module, batch) -> list[torch.Tensor]:
    """The gradient train_step sees, computed apart: a copy of the model, the objective's loss over the batch's count."""
    model = copy.deepcopy(module.model)
    loss, _ = module.objective.loss(model, batch, chunk_size=module.config.parallel.loss_chunk_size)
    return [g.double() for g in torch.autograd.grad(loss / module.objective.count(batch), list(model.parameters()))]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x * y).sum()) for x, y in zip(a, b))


def test_logged_dynamics_equal_an_independent_computation(tmp_path):
    # fp32, as the reference below (under bf16 autocast the logged gradients differ from it in the third digit);
    # clipping acts: g is the raw gradient
    cfg = tiny_config(tmp_path, "run.dtype=fp32", "run.dynamics=true", "optim.grad_clip=0.05")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    module = trainer.module
    data = PatternData(cfg.schedule.resolve())
    weights = [[p.detach().double().clone() for p in module.model.parameters()]]
    grads, logged = [], []
    for step in range(4):
        batch = data.next_batch(step, 8)
        grads.append(reference_gradient(module, batch))
        logged.append(module.train_step([batch], lr=0.01))
        weights.append([p.detach().double().clone() for p in module.model.parameters()])
    updates = [[b - a for a, b in zip(weights[t], weights[t + 1])] for t in range(4)]
    assert "dynamics/grad_cos" not in logged[0] and "dynamics/d1" not in logged[0]
    assert logged[0]["grad_norm"] > 0.05  # the clip changed the step, not the logged gradient
    for t in range(4):
        assert logged[t]["dynamics/update_norm"] == pytest.approx(math.sqrt(dot(updates[t], updates[t])), rel=1e-5)
    for t in range(1, 4):
        g, prev, v = grads[t], grads[t - 1], updates[t - 1]
        cos = dot(g, prev) / math.sqrt(dot(g, g) * dot(prev, prev))
        d1 = dot(g, v) / math.sqrt(dot(v, v))
        d2 = (dot(g, v) - dot(prev, v)) / dot(v, v)
        assert logged[t]["dynamics/grad_cos"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        assert logged[t]["dynamics/d1"] == pytest.approx(d1, rel=1e-4, abs=1e-7)
        assert logged[t]["dynamics/d2"] == pytest.approx(d2, rel=1e-3, abs=1e-6)
        assert logged[t]["dynamics/curvature"] == pytest.approx(abs(d2) / (1 + d1 * d1) ** 1.5, rel=1e-3, abs=1e-6)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_metrics_jsonl_averages_dynamics_over_the_steps_that_have_them_and_the_report_plots_them(tmp_path):
    from minicpm.report.run import write_report

    def run(out, log_every):
        cfg = tiny_config(out, "run.dynamics=true", f"run.log_every={log_every}", "schedule.total_steps=6",
                          "schedule.decay_start=4", "run.checkpoint_every=0")
        train(cfg, data=PatternData(cfg.schedule.resolve()))
        return out

    every_step, pairs = run(tmp_path / "every", 1), run(tmp_path / "pairs", 2)
    one, two = [r for r in records(every_step) if "loss" in r], [r for r in records(pairs) if "loss" in r]
    assert "dynamics/grad_cos" not in one[0] and "dynamics/grad_cos" in one[1]
    # the first line of the pairs run averages steps 1-2: the cosine exists for step 2 only
    assert two[0]["dynamics/grad_cos"] == pytest.approx(one[1]["dynamics/grad_cos"], rel=1e-6)
    assert two[1]["dynamics/grad_cos"] == pytest.approx((one[2]["dynamics/grad_cos"] + one[3]["dynamics/grad_cos"]) / 2,
                                                        rel=1e-6)
    assert two[0]["dynamics/update_norm"] == pytest.approx(
        (one[0]["dynamics/update_norm"] + one[1]["dynamics/update_norm"]) / 2, rel=1e-6)
    written = write_report([every_step])
    assert (every_step / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert every_step / "dynamics.png" in written
