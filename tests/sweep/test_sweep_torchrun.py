"""Sweep trials as torchrun jobs (trial_launcher: torchrun): each trial 2 gloo CPU processes, a failing one recorded
with its one-line error, and the spec's checks."""

import json
import os
import subprocess
import sys

import pytest
from train_helpers import make_datasets

from minicpm.errors import MiniCPMError
from minicpm.sweep.sweep import read_trials_csv
from minicpm.sweep.spec import load_spec


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    tokenizer, code, _ = make_datasets(root / "data")
    path = root / "tiny.yaml"
    # 8 sequences per step: 2 processes x 2 micro-batches of 2
    path.write_text(f"""
model: {{preset: tiny}}
data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}, eval_sequences: 2}}
schedule: {{kind: constant, total_steps: 2, warmup_steps: 1}}
batch: {{tokens_per_step: 256, seq_len: 32, micro_batch_size: 2}}
run: {{log_every: 1, eval_every: 2, checkpoint_every: 2, progress: false, device: cpu, dtype: fp32}}
""")
    return path


def spec_file(directory, recipe, text):
    spec = directory / "spec.yaml"
    spec.write_text(f"base: {{config: {recipe}}}\nspace: {{optim.lr: [0.01, -1.0]}}\nsampler: grid\n{text}")
    return spec


@pytest.mark.parametrize("text, message", [
    ("trial_launcher: mpirun\n", "trial_launcher: expected process | torchrun, got 'mpirun'"),
    ("nproc_per_node: 2\n", "nproc_per_node: 2 processes per trial need trial_launcher: torchrun"),
    ("trial_launcher: torchrun\nnproc_per_node: 0\n", "nproc_per_node: expected a positive integer, got 0"),
])
def test_launcher_options_are_checked(recipe, tmp_path, text, message):
    with pytest.raises(MiniCPMError, match=message):
        load_spec(spec_file(tmp_path, recipe, text))


@pytest.mark.slow
def test_each_trial_is_a_two_process_torchrun_job(recipe, tmp_path):
    spec = spec_file(tmp_path, recipe, "trial_launcher: torchrun\nnproc_per_node: 2\nworkers: 1\n")
    out = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "minicpm", "sweep", str(spec), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {float(r["optim.lr"]): r for r in read_trials_csv(out / "trials.csv")}
    assert rows[0.01]["state"] == "complete" and float(rows[0.01]["eval_loss"]) > 0
    assert rows[-1.0]["state"] == "failed"
    assert rows[-1.0]["error"] == "optim.lr must be positive, got -1.0"  # the rank's error, not torchrun's banner
    state = json.loads((out / "runs/trial_0000/checkpoints/step_00000002/trainer_state.json").read_text())
    assert state["world_size"] == 2
    log = (out / "runs/trial_0000/job.log").read_text()
    assert log.startswith("$ torchrun --standalone --nproc_per_node 2 -m minicpm train ")
