"""Training a MiniCPM-MoE through the one loop: exact resume, activation checkpointing, a balance loss and step that
do not depend on the micro-batch size, and 2 gloo processes with FSDP2 that train like 1 (the aux loss and router
statistics too), their DCP checkpoint resuming in 1.

Run as a script (under torchrun or not), this file is the training process the two-process test starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import Crash, CrashingData, PatternData, metrics_without_timing, tiny_config

from minicpm.rundir import RunDir
from minicpm.train import checkpoint as ckpt
from minicpm.train.loop import train


MOE = ("model.num_experts=4", "model.num_experts_per_tok=2", "model.router_z_loss=true", "run.dtype=fp32")
# 8 sequences of 32 tokens per step: 2 processes x 2 micro-batches of 2, or 1 process x 1 micro-batch of 8
SETTINGS = (*MOE, "schedule.total_steps=6", "schedule.decay_start=4", "run.log_every=1", "run.checkpoint_every=3",
            "batch.micro_batch_size=2", "parallel.activation_checkpointing=selective")
STEP3 = "checkpoints/step_00000003"


def run(cfg, *, resume=False, data=None):
    return train(cfg, resume=resume, data=data or PatternData(cfg.schedule.resolve()))


def step_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def test_moe_resume_after_a_crash_is_bitwise_identical(tmp_path):
    overrides = (*MOE, "schedule.total_steps=8", "schedule.decay_start=6")
    reference = run(tiny_config(tmp_path / "ref", *overrides))
    cfg = tiny_config(tmp_path / "run", *overrides)
    with pytest.raises(Crash):
        run(cfg, data=CrashingData(cfg.schedule.resolve(), 5))  # checkpoint at 3, crash in step 5
    resumed = run(cfg, resume=True)
    records = metrics_without_timing(tmp_path / "run")
    assert records == metrics_without_timing(tmp_path / "ref")
    assert any("aux/router_z" in r and "moe/layer1/router_entropy" in r for r in records)
    assert (reference.checkpoint / "model.safetensors").read_bytes() == \
        (resumed.checkpoint / "model.safetensors").read_bytes()


def test_activation_checkpointing_changes_nothing_for_an_moe(tmp_path):
    common = (*MOE, "schedule.total_steps=3", "schedule.decay_start=2", "run.log_every=1")
    logged = {}
    for mode in ("none", "block", "selective"):
        run(tiny_config(tmp_path / mode, *common, f"parallel.activation_checkpointing={mode}"))
        logged[mode] = [r for r in metrics_without_timing(tmp_path / mode) if "loss" in r]
    for mode in ("block", "selective"):
        for got, want in zip(logged[mode], logged["none"]):
            for key in ("loss", "grad_norm", "aux/load_balance", "aux/router_z", "moe/layer0/load_max"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (mode, key)


@pytest.mark.parametrize("balance_over", ["step", "micro_batch"])
def test_the_balance_loss_and_the_step_are_the_same_for_one_and_four_micro_batches(tmp_path, balance_over):
    common = (*MOE, "schedule.total_steps=3", "schedule.decay_start=2", "run.log_every=1", "run.checkpoint_every=0",
              f"objective.balance_over={balance_over}")
    logged = {}
    for size in (8, 2):  # 8 sequences a step: 1 micro-batch of 8, or 4 of 2 (steps 2 and 3 see the updated weights)
        run(tiny_config(tmp_path / str(size), *common, f"batch.micro_batch_size={size}"))
        logged[size] = step_records(tmp_path / str(size))
    if balance_over == "micro_batch":  # Mixtral's per-micro-batch f: the loss depends on the micro-batch size
        assert logged[2][1]["aux/load_balance"] != pytest.approx(logged[8][1]["aux/load_balance"], rel=1e-4)
        return
    for step in (1, 2, 3):
        # (the per-expert loads are token means, the same too; load_max/min are maxima of each micro-batch's)
        for key in ("loss", "grad_norm", "aux/load_balance", "aux/router_z", "moe/layer1/load_expert3"):
            assert logged[2][step][key] == pytest.approx(logged[8][step][key], rel=1e-5), (step, key)


def torchrun(out_dir, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(out_dir), *args]
    # the processes import this checkout's package, whichever one is installed, and the tests' helpers
    here = Path(__file__).resolve()
    paths = [str(here.parents[2]), str(here.parents[1]), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_train_an_moe_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one micro-batch of 8 in one process against 2 micro-batches of 2 in each of 2 processes
        run(tiny_config(tmp_path / "one", *SETTINGS, "batch.micro_batch_size=8"))
    finally:
        torch.set_num_threads(threads)
    torchrun(tmp_path / "two")
    one, two = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    keys = ("loss", "grad_norm", "aux/load_balance", "aux/router_z", "moe/layer0/load_expert0",
            "moe/layer1/load_expert2")
    for step in one:
        for key in keys:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert ckpt.is_sharded(tmp_path / "two" / STEP3)
    run(tiny_config(tmp_path / "branch", *SETTINGS, f"run.init_from={tmp_path / 'two' / STEP3}"))
    branch = step_records(tmp_path / "branch")
    assert sorted(branch) == [4, 5, 6]
    for step in branch:
        for key in keys:
            assert branch[step][key] == pytest.approx(two[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert RunDir(tmp_path / "two").latest_checkpoint().name == "step_00000006"


def _worker() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    cfg = tiny_config(args.out, *SETTINGS)
    train(cfg, data=PatternData(cfg.schedule.resolve()))


if __name__ == "__main__":
    _worker()
