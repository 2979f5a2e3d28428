"""A run's last evaluation (RunDir.last_eval): the one reader behind a sweep trial's result, a campaign branch's
final loss, a scaling fit's row and the quickstart's summary."""

import json
import math

import pytest
import yaml

from minicpm.errors import MiniCPMError
from minicpm.laws.tables import run_dir_row
from minicpm.rundir import RunDir
from minicpm.sweep.sweep import last_metric


def write_run(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "eval_lo')
    return path


RECORDS = [{"step": 10, "tokens": 640, "lr": 0.01, "loss": 4.0},
           {"step": 10, "eval_loss": 3.9, "eval_bpb": 1.3, "tokens": 640},
           {"step": 20, "tokens": 1280, "lr": 0.005, "loss": 3.5},
           {"step": 20, "eval_loss": 3.4, "eval_bpb": 1.1},  # an eval line without tokens
           {"step": 25, "tokens": 1600, "lr": 0.001, "loss": 3.3}]


def test_the_last_eval_is_the_last_record_with_the_key_its_tokens_from_the_training_line(tmp_path):
    run = RunDir(write_run(tmp_path / "run", RECORDS))  # the torn last line of a killed writer is skipped
    assert run.last_eval() == {"step": 20, "eval_loss": 3.4, "eval_bpb": 1.1, "tokens": 1280}
    assert run.last_eval("eval_bpb", step=10) == RECORDS[1]
    assert run.last_eval(step=15) is None and run.last_eval("eval/code/bpb") is None
    assert run.last_eval("loss")["step"] == 25
    assert RunDir(tmp_path / "none").last_eval() is None


def test_every_reader_of_a_runs_result_takes_the_last_eval(tmp_path):
    run = write_run(tmp_path / "run", RECORDS)
    assert last_metric(run, "eval_loss") == 3.4
    assert run_dir_row(run) == {"params": run_dir_row(run)["params"], "tokens": 1280, "loss": 3.4, "run": "run"}
    assert run_dir_row(run, "eval_bpb")["loss"] == 1.1


def test_a_diverged_last_eval_fails_the_trial_and_is_refused_by_the_fit(tmp_path):
    run = write_run(tmp_path / "run", [*RECORDS, {"step": 30, "tokens": 1920, "eval_loss": math.nan}])
    assert math.isnan(RunDir(run).last_eval()["eval_loss"])
    assert last_metric(run, "eval_loss") is None
    with pytest.raises(MiniCPMError, match=r"metrics.jsonl: step 30: the last 'eval_loss' is nan \(the run diverged\)"):
        run_dir_row(run)
