"""End to end through the command line: train, branch a decay, report."""

import base64

import pytest

from minicpm.checkpoints.verify import read_trainer_state
from minicpm.rundir import RunDir


@pytest.mark.slow
def test_train_then_branch_a_decay_then_report(tmp_path, cli, datasets):
    tokenizer, code, prose = datasets
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
model: {{preset: tiny}}
data:
  stable: {{{code}: 1.0}}
  decay: {{{code}: 0.3, {prose}: 0.7}}
  tokenizer: {tokenizer}
  eval_sequences: 8
schedule: {{kind: constant, total_steps: 10, warmup_steps: 2}}
batch: {{tokens_per_step: 256, seq_len: 32, micro_batch_size: 4}}
run: {{log_every: 2, eval_every: 5, checkpoint_every: 5, progress: false, device: cpu}}
""")
    stable = cli("train", recipe, "optim.lr=0.02", "--out", "stable", cwd=tmp_path)
    assert stable.returncode == 0, stable.stderr
    assert "done: stable at step 10" in stable.stdout and "eval loss" in stable.stdout
    assert [p.name for p in RunDir(tmp_path / "stable").list_checkpoints()] == ["step_00000005", "step_00000010"]

    branch = cli("train", "--from", "stable/checkpoints/step_00000005", "--decay-steps", "4", "--decay", "linear",
                 "--out", "decay5", cwd=tmp_path)
    assert branch.returncode == 0, branch.stderr
    assert "resuming" in branch.stdout and "linear decay for 4 steps" in branch.stdout
    assert read_trainer_state(RunDir(tmp_path / "decay5").list_checkpoints()[-1])["step"] == 9
    records = RunDir(tmp_path / "decay5").read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [6, 8, 9]
    stable_at_5 = [r for r in RunDir(tmp_path / "stable").read_metrics() if r["step"] == 5 and "eval_loss" in r][0]
    assert records[-1]["eval_loss"] < stable_at_5["eval_loss"]  # the decay lowers the held-out loss of its source
    assert "optim:\n  lr: 0.02" in (tmp_path / "decay5/config.yaml").read_text()

    again = cli("train", "--resume", "--out", "decay5", cwd=tmp_path)
    assert again.returncode == 0 and "at step 9" in again.stdout, again.stderr

    report = cli("report", "stable", "decay5", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report/report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "decay5" in page and "stable" in page
    png = base64.b64decode(page.split("data:image/png;base64,")[1].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "report/loss.png").read_bytes() == png


@pytest.mark.parametrize("args, message", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["schedule.kind=cosinus"], "schedule.kind"),
    (["--decay-steps", "5"], "--from"),
])
def test_train_errors_are_one_line_naming_the_key(tmp_path, args, message, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: tiny}\n")
    result = cli("train", recipe, *args, "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
