"""`minicpm train` under torchrun: 2 gloo processes with FSDP2 train like 1, and their sharded checkpoints resume
on 1 (and 1's on 2), after a kill too, and export to the official layout.

Run as a script (under torchrun or not), this file is the training process the tests start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import PatternData, tiny_config

from minicpm.checkpoints.verify import read_trainer_state
from minicpm.checkpoints.weights import consolidate
from minicpm.model.transformer import MiniCPM
from minicpm.rundir import RunDir
from minicpm.train import checkpoint as ckpt
from minicpm.train.loop import Trainer, train

pytestmark = pytest.mark.slow  # every test reads the runs of a two-process torchrun

# 8 sequences of 32 tokens per step: 2 processes x 2 micro-batches of 2, or 1 process x 4 micro-batches of 2
SETTINGS = ("run.dtype=fp32", "schedule.total_steps=6", "schedule.decay_start=4", "run.log_every=1", "run.checkpoint_every=3",
            "batch.micro_batch_size=2", "parallel.activation_checkpointing=selective", "parallel.loss_chunk_size=48")
STEP3 = "checkpoints/step_00000003"


def config(out_dir, *overrides):
    return tiny_config(out_dir, *SETTINGS, *overrides)


class HangingData(PatternData):
    """Announces itself (MARKER.RANK holding its pid) and then hangs when asked for the batch of `step`: a process to
    be killed there."""

    def __init__(self, schedule, step, marker):
        super().__init__(schedule)
        self.hang_step, self.marker = step, Path(marker)

    def next_batch(self, step, sequences):
        if step == self.hang_step:
            announce = Path(f"{self.marker}.{os.environ.get('RANK', '0')}")
            partial = Path(f"{announce}.partial")
            partial.write_text(str(os.getpid()))
            os.replace(partial, announce)  # never seen half-written
            time.sleep(600)
        return super().next_batch(step, sequences)


def torchrun(out_dir, *args, processes=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           __file__, str(out_dir), *args]
    # the ranks run this file as a script: put tests/ on their path for train_helpers
    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _kill(pid: int) -> None:
    """SIGKILL to a process (a group when negative) that may be gone already."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def step_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def assert_same_steps(got, want, steps):
    for step in steps:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-5), (step, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps in 1 process (in this one) and in 2 (torchrun); both checkpoint at steps 3 and 6."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config(root / "one")
        train(cfg, data=PatternData(cfg.schedule.resolve()))
    finally:
        torch.set_num_threads(threads)
    torchrun(root / "two")
    return root / "one", root / "two"


def test_two_processes_log_the_losses_of_one(runs):
    one, two = map(step_records, runs)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    assert_same_steps(two, one, range(1, 7))
    assert one[6]["loss"] < one[1]["loss"]


def test_a_sharded_checkpoint_holds_each_rank_shards_and_the_same_trainer_state(runs):
    one, two = (run / STEP3 for run in runs)
    assert ckpt.is_sharded(two) and not ckpt.is_sharded(one)
    assert sorted(p.name for p in (two / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (two / "model.safetensors").exists()
    state_one, state_two = read_trainer_state(one), read_trainer_state(two)
    assert state_one.keys() == state_two.keys()
    assert (state_two["world_size"], state_one["world_size"]) == (2, 1)
    for key in ("step", "tokens", "data", "interval", "bad_steps", "schedule"):
        assert state_two[key] == state_one[key], key
    assert RunDir(runs[1]).latest_checkpoint().name == "step_00000006"


def test_a_checkpoint_from_two_processes_resumes_in_one(runs, tmp_path):
    cfg = config(tmp_path / "branch", f"run.init_from={runs[1] / STEP3}")
    train(cfg, data=PatternData(cfg.schedule.resolve()))
    branch = step_records(tmp_path / "branch")
    assert sorted(branch) == [4, 5, 6]
    assert_same_steps(branch, step_records(runs[1]), [4, 5, 6])


def test_a_checkpoint_from_one_process_resumes_in_two(runs, tmp_path):
    torchrun(tmp_path / "branch", "--from", str(runs[0] / STEP3))
    branch = step_records(tmp_path / "branch")
    assert sorted(branch) == [4, 5, 6]
    assert_same_steps(branch, step_records(runs[0]), [4, 5, 6])


@pytest.mark.slow
def test_a_killed_two_process_run_resumes(runs, tmp_path):
    marker = tmp_path / "hanging"
    ranks = [Path(f"{marker}.{rank}") for rank in range(2)]
    proc = torchrun(tmp_path / "run", "--hang-at", "4", str(marker), wait=False)
    try:
        deadline = time.monotonic() + 180
        while not all(r.exists() for r in ranks):
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.5)
    finally:
        # torchrun and both ranks (which run in sessions of their own): nobody gets to clean up
        for r in ranks:
            if r.exists():
                _kill(int(r.read_text()))
        _kill(-proc.pid)  # torchrun's process group
        proc.wait()
    assert RunDir(tmp_path / "run").latest_checkpoint().name == "step_00000003"
    torchrun(tmp_path / "run", "--resume")
    assert_same_steps(step_records(tmp_path / "run"), step_records(runs[1]), range(1, 7))


def test_export_writes_a_sharded_checkpoint_in_the_official_layout(runs, tmp_path, cli):
    from minicpm.interop.hf import load_model

    sharded = runs[1] / STEP3
    model_config, state = consolidate(sharded)
    with torch.device("meta"):
        assert state.keys() == MiniCPM(model_config).state_dict().keys()
    # the weights a one-process resume loads from the same shards
    cfg = config(tmp_path / "load")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    ckpt.load_training_state(sharded, trainer.module.model, trainer.module.optimizer)
    for name, tensor in trainer.module.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    proc = cli("export", sharded, tmp_path / "official", "--to", "minicpm")
    assert proc.returncode == 0, proc.stderr
    exported = load_model(tmp_path / "official").state_dict()
    assert exported.keys() == state.keys()
    for name in state:
        assert torch.equal(exported[name], state[name]), name


def _worker() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--from", dest="init_from", default=None)
    parser.add_argument("--hang-at", nargs=2, default=None)
    args = parser.parse_args()
    cfg = config(args.out, *([f"run.init_from={args.init_from}"] if args.init_from else []))
    schedule = cfg.schedule.resolve()
    data = HangingData(schedule, int(args.hang_at[0]), args.hang_at[1]) if args.hang_at else PatternData(schedule)
    train(cfg, resume=args.resume, data=data)


if __name__ == "__main__":
    _worker()
