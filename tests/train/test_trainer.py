import hashlib
import math
import random

import pytest
import torch
from train_helpers import Crash, CrashingData, PatternData, metrics_without_timing, tiny_config

from minicpm.checkpoints.verify import read_trainer_state
from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir
from minicpm.train.launch import launch_config
from minicpm.train.loop import Trainer, train
from minicpm.train.objectives import NextToken

# runs that leave run.dtype at auto: CI runs them a second time as a CPU with native bf16 kernels would
# (MINICPM_AUTO_DTYPE=bf16 python -m pytest -m auto_dtype)
pytestmark = pytest.mark.auto_dtype


# tiny models run on one thread (see conftest)


def run(cfg, *, resume=False, data=None):
    data = data or PatternData(cfg.schedule.resolve())
    return train(cfg, resume=resume, data=data)


def tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_training_lowers_the_loss_and_writes_the_run_directory(tmp_path):
    result = run(tiny_config(tmp_path / "run", "schedule.total_steps=30", "schedule.decay_start=24",
                             "run.checkpoint_every=10", "run.keep_last=2"))
    records = metrics_without_timing(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(2, 31, 2))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[0]["lr"] == 0.01  # the last of 2 warmup steps reaches the peak
    assert {r["stage"] for r in records} == {"stable", "decay"}
    names = [p.name for p in RunDir(tmp_path / "run").list_checkpoints()]
    assert names == ["step_00000020", "step_00000030"]  # keep_last=2
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000030"
    latest = result.checkpoint
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "config.json", "optimizer.pt",
                                                   "trainer_state.json"}
    assert read_trainer_state(latest)["tokens"] == 30 * 256
    assert (tmp_path / "run/config.yaml").read_text().count("hidden_size: 64") == 1


@pytest.mark.parametrize("crash_step", [pytest.param(7, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow),
                                        random.Random().randrange(1, 12)])
def test_resume_after_a_crash_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, crash_step):
    # checkpoints every 3 steps, the decay starts at step 8: a crash at 7 resumes from 6, across the boundary
    reference = run(tiny_config(tmp_path / "ref"))
    cfg = tiny_config(tmp_path / "run")
    with pytest.raises(Crash):
        run(cfg, data=CrashingData(cfg.schedule.resolve(), crash_step))
    resumed = run(cfg, resume=True)
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "ref"), crash_step
    a, b = read_trainer_state(reference.checkpoint), read_trainer_state(resumed.checkpoint)
    assert (a["step"], a["tokens"], a["data"]) == (b["step"], b["tokens"], b["data"])
    assert (reference.checkpoint / "model.safetensors").read_bytes() == \
        (resumed.checkpoint / "model.safetensors").read_bytes()


def test_a_run_directory_is_not_overwritten_without_resume(tmp_path):
    run(tiny_config(tmp_path / "run", "schedule.total_steps=3", "schedule.decay_start=2"))
    with pytest.raises(MiniCPMError, match="already holds a run.*--resume"):
        run(tiny_config(tmp_path / "run", "schedule.total_steps=3", "schedule.decay_start=2"))


def test_a_decay_branch_starts_from_its_checkpoint_and_leaves_the_source_untouched(tmp_path):
    stable = tiny_config(tmp_path / "stable", "schedule.kind=constant", "schedule.total_steps=9",
                         "schedule.decay_start=null", "run.checkpoint_every=3")
    run(stable)
    before = tree_digest(tmp_path / "stable")
    source = tmp_path / "stable/checkpoints/step_00000006"
    branch = launch_config(None, [], out=str(tmp_path / "branch"), init_from=str(source), decay_steps=6)
    assert (branch.schedule.kind, branch.schedule.total_steps, branch.schedule.decay_steps) == ("wsd", 12, 6)
    run(branch)
    assert tree_digest(tmp_path / "stable") == before
    # the branch equals a run whose own decay starts at step 6: same weights, optimizer and data at the start
    in_run = run(tiny_config(tmp_path / "in_run", "schedule.decay_start=6"))
    branched = metrics_without_timing(tmp_path / "branch")
    assert branched[0]["step"] == 8  # the source logged up to step 6
    assert branched == [r for r in metrics_without_timing(tmp_path / "in_run") if r["step"] > 6]
    assert read_trainer_state(in_run.checkpoint)["step"] == 12
    with pytest.raises(MiniCPMError, match="never writes into its source"):
        launch_config(None, [], out=str(tmp_path / "stable"), init_from=str(source), decay_steps=6)


def test_continuing_the_stable_phase_from_a_checkpoint_extends_the_run(tmp_path):
    run(tiny_config(tmp_path / "stable", "schedule.kind=constant", "schedule.total_steps=6",
                    "schedule.decay_start=null"))
    cont = launch_config(None, ["schedule.total_steps=9"], out=str(tmp_path / "more"),
                         init_from=str(tmp_path / "stable"))
    result = run(cont)
    assert result.step == 9 and result.tokens == 9 * 256
    assert [r["step"] for r in metrics_without_timing(tmp_path / "more")] == [8, 9]


class NaNAt(NextToken):
    def __init__(self, bad_steps, trainer_step):
        super().__init__()
        self.bad_steps, self.trainer_step = bad_steps, trainer_step

    def loss(self, model, batch, **kwargs):
        loss, metrics = super().loss(model, batch, **kwargs)
        return (loss * math.nan if self.trainer_step() in self.bad_steps else loss), metrics


def test_nan_steps_are_skipped_and_logged_and_too_many_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", "run.log_every=1", "run.max_bad_steps=3")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    trainer.module.objective = NaNAt({4, 5}, lambda: trainer.step)
    trainer.fit()
    records = metrics_without_timing(tmp_path / "run")
    assert [r.get("skipped_steps") for r in records[3:6]] == [None, 1, 1]
    assert "loss" not in records[4] and math.isfinite(records[-1]["loss"])

    cfg = tiny_config(tmp_path / "bad", "run.log_every=1", "run.max_bad_steps=3")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    trainer.module.objective = NaNAt(set(range(4, 12)), lambda: trainer.step)
    with pytest.raises(MiniCPMError, match=r"3 steps in a row.*step_00000003"):
        trainer.fit()
    good = RunDir(tmp_path / "bad").latest_checkpoint()
    assert good.name == "step_00000003"  # no save during the streak of skipped steps
    assert read_trainer_state(good)["bad_steps"] == 0


@pytest.mark.slow
def test_gradient_accumulation_does_not_change_the_step(tmp_path):
    one = run(tiny_config(tmp_path / "a", "batch.micro_batch_size=8", "run.dtype=fp32"))
    four = run(tiny_config(tmp_path / "b", "batch.micro_batch_size=2", "run.dtype=fp32"))
    la = [r["loss"] for r in metrics_without_timing(tmp_path / "a")]
    lb = [r["loss"] for r in metrics_without_timing(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)
    assert one.step == four.step == 12


def test_loss_chunking_is_read_from_the_config(tmp_path):
    run(tiny_config(tmp_path / "a", "run.dtype=fp32"))
    run(tiny_config(tmp_path / "b", "run.dtype=fp32", "parallel.loss_chunk_size=40"))
    la = [r["loss"] for r in metrics_without_timing(tmp_path / "a")]
    lb = [r["loss"] for r in metrics_without_timing(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_mup_groups_get_their_scaled_learning_rate(tmp_path):
    cfg = tiny_config(tmp_path / "run", "schedule.total_steps=3", "schedule.decay_start=2")
    trainer = Trainer(cfg, data=PatternData(cfg.schedule.resolve()))
    trainer.fit()
    m = trainer.model_config.width_multiplier
    lrs = {g["name"]: g["lr"] for g in trainer.module.optimizer.param_groups}
    factor = cfg.schedule.resolve()(2)
    assert lrs["matrices"] == pytest.approx(0.01 * factor / m)
    assert lrs["gains"] == pytest.approx(0.01 * factor)
    assert all(p.dtype == torch.float32 for p in trainer.module.model.parameters())


def test_activation_checkpointing_is_read_from_the_config_and_changes_nothing_but_memory(tmp_path):
    run(tiny_config(tmp_path / "a", "run.dtype=fp32"))
    run(tiny_config(tmp_path / "b", "run.dtype=fp32", "parallel.activation_checkpointing=block"))
    la = [r["loss"] for r in metrics_without_timing(tmp_path / "a")]
    lb = [r["loss"] for r in metrics_without_timing(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-5)
