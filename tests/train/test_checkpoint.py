import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import PatternData, metrics_without_timing, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir, resolve_checkpoint
from minicpm.train import checkpoint as ckpt
from minicpm.train.loop import Trainer, train

TESTS = Path(__file__).resolve().parents[1]


# tiny models on one thread; the killed subprocess runs on one too (OMP_NUM_THREADS=1), so results match bitwise


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import minicpm.interop.hf as hf
    from train_helpers import PatternData, tiny_config
    from minicpm.train.loop import train

    real_write = hf.write_model_files

    def write_then_hang(directory, model, **kwargs):
        names = real_write(directory, model, **kwargs)
        if "step_00000009" in str(directory):  # half of the step-9 checkpoint is on disk: wait for the kill
            Path(sys.argv[2]).write_text("saving")
            time.sleep(600)
        return names

    hf.write_model_files = write_then_hang
    cfg = tiny_config(sys.argv[1])
    train(cfg, data=PatternData(cfg.schedule.resolve()))
""")


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    marker = tmp_path / "saving"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "run"), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # generous: a loaded machine may be slow to start the subprocess
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached its step-9 checkpoint"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert any(p.name.startswith(".") for p in root.iterdir())  # the half-written step 9
    assert RunDir(tmp_path / "run").latest_checkpoint().name == "step_00000006"

    cfg = tiny_config(tmp_path / "run")
    resumed = train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    reference = tiny_config(tmp_path / "ref")
    expected = train(reference, data=PatternData(reference.schedule.resolve()))
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "ref")
    assert (resumed.checkpoint / "model.safetensors").read_bytes() == \
        (expected.checkpoint / "model.safetensors").read_bytes()
    assert not any(p.name.startswith(".") for p in root.iterdir())


def make_run(tmp_path, *overrides):
    cfg = tiny_config(tmp_path / "run", "schedule.total_steps=6", "schedule.decay_start=4", *overrides)
    return train(cfg, data=PatternData(cfg.schedule.resolve()))


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    make_run(tmp_path)
    run = tmp_path / "run"
    assert [p.name for p in RunDir(run).list_checkpoints()] == ["step_00000003", "step_00000006"]
    (run / "checkpoints/latest").write_text("step_00000099\n")
    assert RunDir(run).latest_checkpoint().name == "step_00000006"
    (run / "checkpoints/step_00000006/trainer_state.json").unlink()  # incomplete: never picked
    assert RunDir(run).latest_checkpoint().name == "step_00000003"
    assert resolve_checkpoint(run).name == "step_00000003"
    with pytest.raises(MiniCPMError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_checkpoint_files_load_without_unpickling(tmp_path):
    result = make_run(tmp_path)
    state = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)
    assert [g["name"] for g in state["param_groups"]] == ["matrices", "vocabulary", "gains"]  # classic muP
    trainer_state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert (trainer_state["step"], trainer_state["tokens"]) == (6, 6 * 256)
    assert set(trainer_state["rng"]) >= {"python", "numpy", "torch"}
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["model_type"] == "minicpm" and config["hidden_size"] == 64


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_loading_into_a_different_architecture_names_the_field(tmp_path):
    result = make_run(tmp_path)
    cfg = tiny_config(tmp_path / "other", "model.num_hidden_layers=3")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    with pytest.raises(MiniCPMError, match="num_hidden_layers"):
        ckpt.load_model_weights(result.checkpoint, trainer.module.model)


def test_loaded_optimizer_keeps_the_hyperparameters_of_the_new_config(tmp_path):
    result = make_run(tmp_path)
    cfg = tiny_config(tmp_path / "other", "optim.weight_decay=0.0")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    ckpt.load_optimizer(result.checkpoint, trainer.module.optimizer)
    assert {g["weight_decay"] for g in trainer.module.optimizer.param_groups} == {0.0}
    assert all(int(s["step"]) == 6 for s in trainer.module.optimizer.state.values())
