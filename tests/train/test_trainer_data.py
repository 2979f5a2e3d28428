"""The trainer on real prepared datasets: two-stage mixtures, held-out evaluation, exact resume."""

import math

import pytest
from train_helpers import metrics_without_timing, tiny_config

from minicpm.checkpoints.verify import read_trainer_state
from minicpm.data.mixture import bytes_per_token
from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir
from minicpm.data.pretrain import PretrainData
from minicpm.train.loop import Trainer, train

# runs that leave run.dtype at auto: CI runs them a second time as a CPU with native bf16 kernels would
# (MINICPM_AUTO_DTYPE=bf16 python -m pytest -m auto_dtype)
pytestmark = pytest.mark.auto_dtype



def data_config(out_dir, datasets, *overrides):
    tokenizer, code, prose = datasets
    return tiny_config(out_dir, f"data.tokenizer={tokenizer}", f"data.stable={{{code}: 1.0}}",
                       f"data.decay={{{code}: 0.5, {prose}: 0.5}}", *overrides)


class CrashAt(PretrainData):
    crash_step = -1

    def next_batch(self, step, sequences):
        if step == self.crash_step:
            raise KeyboardInterrupt
        return super().next_batch(step, sequences)


@pytest.mark.slow
def test_resume_across_the_stable_to_decay_boundary_is_bitwise_identical(tmp_path, datasets):
    train(data_config(tmp_path / "ref", datasets))
    cfg = data_config(tmp_path / "run", datasets)
    trainer = Trainer(cfg)
    crashing = CrashAt(cfg.data.stable, cfg.data.decay, trainer.schedule, seq_len=32, seed=0, tokenizer_hash=trainer.tokenizer_hash)
    crashing.crash_step = 10  # checkpoint at 9, decay from step 8: the decay data state must come back too
    trainer.data = crashing
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    train(cfg, resume=True)
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "ref")
    assert read_trainer_state(RunDir(tmp_path / "run").latest_checkpoint())["data"] == \
        read_trainer_state(RunDir(tmp_path / "ref").latest_checkpoint())["data"]


def test_the_decay_stage_reads_its_own_mix_where_the_stable_stage_stopped(tmp_path, datasets):
    _, code, prose = datasets
    result = train(data_config(tmp_path / "run", datasets))
    state = read_trainer_state(result.checkpoint)["data"]
    drawn = {d["name"]: d["sequences"] for d in state["decay"]["datasets"]}
    stable_drawn = {d["name"]: d["sequences"] for d in state["stable"]["datasets"]}
    assert stable_drawn == {str(code): 8 * 8}  # 8 stable steps of 8 sequences
    # 4 decay steps of 8 sequences, half from each, and code continued from where the stable stage was
    assert drawn == {str(code): 8 * 8 + 16, str(prose): 16}
    stages = [r["stage"] for r in metrics_without_timing(tmp_path / "run") if "stage" in r]
    assert stages == ["stable"] * 4 + ["decay"] * 2


def test_evaluation_reports_loss_and_bits_per_byte_per_dataset(tmp_path, datasets):
    _, code, prose = datasets
    train(data_config(tmp_path / "run", datasets, "run.eval_every=6", "data.eval_sequences=8"))
    evals = [r for r in metrics_without_timing(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    last = evals[-1]
    assert last["eval/heldout/code/bpb"] == pytest.approx(last["eval/heldout/code/loss"] / math.log(2) / bytes_per_token([code]))
    assert last["eval_loss"] == pytest.approx((last["eval/heldout/code/loss"] + last["eval/heldout/prose/loss"]) / 2)
    assert evals[1]["eval/heldout/code/loss"] < evals[0]["eval/heldout/code/loss"]
    assert last["eval/heldout/loss"] == last["eval_loss"] and last["eval/heldout/bpb"] == last["eval_bpb"]


def test_shards_from_another_tokenizer_are_rejected(tmp_path, datasets):
    from minicpm.data.tokenizer import train_tokenizer
    from train_helpers import write_corpus

    other = train_tokenizer([str(write_corpus(tmp_path / "t", documents=20, seed=5, style="prose"))], 300,
                            tmp_path / "tok")
    with pytest.raises(MiniCPMError, match="tokenizer"):
        Trainer(data_config(tmp_path / "run", datasets, f"data.tokenizer={other}"))
