"""The batch-size ramp: the batch of each step, the tokens it adds up to, one-line errors, and a resume across the
ramp's boundary that is bitwise the uninterrupted run."""

import pytest
from train_helpers import Crash, CrashingData, PatternData, metrics_without_timing, tiny_config

from minicpm.checkpoints.verify import read_trainer_state
from minicpm.cli import main
from minicpm.train.config import load_config
from minicpm.errors import MiniCPMError
from minicpm.train.batch_ramp import batch_ramp
from minicpm.train.loop import train


RAMP = "batch.ramp=[{until_tokens: 640, tokens_per_step: 128}]"  # 5 steps of 128 tokens, then 256 per step


def ramp_of(*overrides):
    return batch_ramp(load_config(None, ["model.preset=tiny", "batch.seq_len=32", "batch.micro_batch_size=4",
                                         "batch.tokens_per_step=512", *overrides]).batch)


def test_each_step_takes_its_stage_batch_and_the_tokens_add_up():
    ramp = ramp_of("batch.ramp=[{until_tokens: 1280, tokens_per_step: 128}, {until_step: 14, tokens_per_step: 256}]")
    assert ramp.stages == ((10, 128), (14, 256))
    assert [ramp.tokens_per_step(s) for s in (0, 9, 10, 13, 14, 100)] == [128, 128, 256, 256, 512, 512]
    for step in range(0, 20):
        assert ramp.tokens_before(step) == sum(ramp.tokens_per_step(s) for s in range(step))
    assert ramp_of().stages == () and ramp_of().tokens_before(7) == 7 * 512


@pytest.mark.parametrize("ramp, message", [
    ("[{until_tokens: 600, tokens_per_step: 128}]", r"batch.ramp\[0\].until_tokens: .*step boundary"),
    ("[{until_tokens: 640, tokens_per_step: 100}]", r"batch.ramp\[0\].tokens_per_step: .*multiple of batch.seq_len"),
    ("[{until_tokens: 640, tokens_per_step: 96}]", r"batch.ramp\[0\].tokens_per_step: .*micro-batches of 4"),
    ("[{tokens_per_step: 128}]", r"batch.ramp\[0\]: give one of until_tokens and until_step"),
    ("[{until_step: 5, tokens_per_step: 128}, {until_step: 5, tokens_per_step: 256}]",
     r"batch.ramp\[1\].until_step: 5 must be after"),
    ("[{until_steps: 5, tokens_per_step: 128}]", r"until_steps"),
])
def test_a_bad_ramp_is_one_line_naming_the_stage(ramp, message):
    with pytest.raises(MiniCPMError, match=message):
        ramp_of(f"batch.ramp={ramp}")


def test_the_cli_rejects_a_bad_ramp_with_exit_2_and_writes_nothing(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model: {preset: tiny}\nbatch: {seq_len: 32, micro_batch_size: 4, tokens_per_step: 256}\n")
    code = main(["train", str(recipe), "batch.ramp=[{until_tokens: 600, tokens_per_step: 128}]",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch.ramp[0].until_tokens" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_ramp_sets_each_step_batch_and_counts_its_tokens(tmp_path):
    cfg = tiny_config(tmp_path / "run", RAMP, "run.log_every=1")
    drawn = []

    class Recording(PatternData):
        def next_batch(self, step, sequences):
            drawn.append((step, sequences))
            return super().next_batch(step, sequences)

    result = train(cfg, data=Recording(cfg.schedule.resolve()))
    assert drawn == [(s, 4 if s < 5 else 8) for s in range(12)]
    assert result.tokens == 5 * 128 + 7 * 256
    records = metrics_without_timing(tmp_path / "run")
    assert [(r["step"], r["tokens"], r["batch_tokens"]) for r in records][4:6] == [(5, 640, 128), (6, 896, 256)]


@pytest.mark.parametrize("crash_step", [4, 7])
def test_resume_across_the_ramp_boundary_is_bitwise_the_uninterrupted_run(tmp_path, crash_step):
    # checkpoints every 3 steps, the ramp ends after step 5: a crash at 7 resumes from 6 (after the switch), one at
    # 4 resumes from 3 (before it) and crosses it again
    reference = train(tiny_config(tmp_path / "ref", RAMP), data=PatternData(tiny_config(tmp_path).schedule.resolve()))
    cfg = tiny_config(tmp_path / "run", RAMP)
    with pytest.raises(Crash):
        train(cfg, data=CrashingData(cfg.schedule.resolve(), crash_step))
    resumed = train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "ref")
    a, b = read_trainer_state(reference.checkpoint), read_trainer_state(resumed.checkpoint)
    assert (a["step"], a["tokens"], a["data"]) == (b["step"], b["tokens"], b["data"]) == (
        12, 5 * 128 + 7 * 256, a["data"])
    assert (reference.checkpoint / "model.safetensors").read_bytes() == \
        (resumed.checkpoint / "model.safetensors").read_bytes()
