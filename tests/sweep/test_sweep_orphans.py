"""A sweep killed with SIGKILL takes its running trial with it (no orphan keeps training into its run directory)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import make_datasets


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_trial_ends_with_its_killed_sweep(tmp_path):
    tokenizer, code, _ = make_datasets(tmp_path / "data")
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"""
model: {{preset: tiny}}
data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}, eval_sequences: 2}}
schedule: {{kind: constant, total_steps: 1000000, warmup_steps: 1}}
batch: {{tokens_per_step: 128, seq_len: 32, micro_batch_size: 4}}
run: {{log_every: 100, eval_every: 0, checkpoint_every: 0, progress: false, device: cpu, dtype: fp32}}
""")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {{config: {recipe}}}\nspace: {{optim.lr: [0.01]}}\nsampler: grid\nworkers: 1\n")
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "minicpm", "sweep", str(spec), "--out", str(out)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    owner = out / "runs/trial_0000/.lock.owner"
    deadline = time.time() + 300
    while not owner.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert owner.is_file(), "the trial never started"
    trial = int(owner.read_text().split()[1])
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 30
    while alive(trial) and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert not alive(trial), "the trial outlived its sweep"
    finally:
        if alive(trial):
            os.kill(trial, signal.SIGKILL)
