"""parallel.compile: auto counts the steps this start will train, and stays eager where compiling was not measured
to pay (fp32 on a CPU)."""

from types import SimpleNamespace

import torch

from minicpm.rundir import RunDir, checkpoint_name
from minicpm.train.distributed import compile_choice, steps_to_train


def run_config(out_dir, *, total_steps, init_from=None):
    return SimpleNamespace(run=SimpleNamespace(out_dir=str(out_dir), init_from=init_from),
                           schedule=SimpleNamespace(total_steps=total_steps))


def complete_checkpoint(run: RunDir, step: int):
    path = run.checkpoint_dir(step)
    path.mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.json"):  # complete: weights and trainer state (rundir.is_complete)
        (path / name).write_text("{}")
    return path


def test_a_fresh_run_trains_all_its_steps_a_branch_and_a_resume_only_the_rest(tmp_path):
    assert steps_to_train(run_config(tmp_path / "fresh", total_steps=240)) == 240
    source = complete_checkpoint(RunDir(tmp_path / "stable"), 240)
    assert source.name == checkpoint_name(240)
    assert steps_to_train(run_config(tmp_path / "decay", total_steps=264, init_from=str(source))) == 24
    resumed = RunDir(tmp_path / "resumed")
    complete_checkpoint(resumed, 100)
    assert steps_to_train(run_config(resumed.path, total_steps=240)) == 140


def test_auto_stays_eager_in_fp32_on_a_cpu_however_long_the_run():
    choice = compile_choice("auto", step_flops=1e15, steps=10**6, device=torch.device("cpu"), dtype=torch.float32)
    assert not choice.compile and choice.reason.startswith("eager (auto:")
    assert compile_choice(True, step_flops=1.0, steps=1, device=torch.device("cpu"), dtype=torch.float32).compile
