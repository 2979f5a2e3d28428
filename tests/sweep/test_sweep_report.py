"""`minicpm report SWEEP_DIR`: the sweep drawn from its trials.csv, best trials ranked in the study's direction,
failed trials listed with their one-line error."""

import pytest

from minicpm.cli import main
from minicpm.errors import MiniCPMError
from minicpm.sweep.sweep import open_storage, trials_csv
from minicpm.sweep.report import read_sweep

KEYS = ["optim.lr", "model.scale_emb"]


def write_sweep(directory, direction=None):
    rows = [
        {"number": 0, "state": "complete", "params": {"optim.lr": 0.01, "model.scale_emb": 12}, "value": 4.5},
        {"number": 1, "state": "failed", "params": {"optim.lr": -1.0, "model.scale_emb": 6}, "value": None,
         "error": "optim.lr must be positive, got -1.0"},
        {"number": 2, "state": "complete", "params": {"optim.lr": 0.04, "model.scale_emb": 24}, "value": 4.1},
        {"number": 3, "state": "complete", "params": {"optim.lr": 0.002, "model.scale_emb": 6}, "value": 4.8},
    ]
    for row in rows:
        row.setdefault("error", "")
        row["run_dir"] = str(directory / "runs" / f"trial_{row['number']:04d}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trials.csv").write_text(trials_csv(rows, KEYS, "eval_loss"))
    if direction:
        import optuna

        optuna.create_study(storage=open_storage(directory, None), study_name="s", direction=direction)
    return directory


def test_the_trials_are_read_back_with_their_parameters_metric_and_errors(tmp_path):
    table = read_sweep(write_sweep(tmp_path / "sweep"))
    assert (table.keys, table.metric, table.direction) == (KEYS, "eval_loss", "minimize")
    assert [r["number"] for r in table.complete()] == [2, 0, 3]
    assert [(r["number"], r["error"]) for r in table.failed()] == [(1, "optim.lr must be positive, got -1.0")]
    assert table.rows[2]["params"] == {"optim.lr": 0.04, "model.scale_emb": 24.0}


def test_a_maximised_metric_ranks_the_highest_first(tmp_path):
    table = read_sweep(write_sweep(tmp_path / "sweep", direction="maximize"))
    assert table.direction == "maximize" and [r["number"] for r in table.complete()] == [3, 0, 2]


def test_report_on_a_sweep_directory_draws_it_and_lists_best_and_failed(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep")
    assert main(["report", str(sweep), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "4 trials: 3 complete, 1 failed; eval_loss, minimize"
    assert printed[1].startswith("  trial 2: eval_loss 4.1000 (optim.lr=0.04, model.scale_emb=24)")
    assert "  failed: trial 1: optim.lr must be positive, got -1.0" in printed
    assert (tmp_path / "out/sweep.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "out/report.html").read_text()
    assert "optim.lr must be positive, got -1.0" in page
    assert page.index("trial_0002") < page.index("trial_0000") < page.index("trial_0003")


def test_a_file_that_is_not_a_trials_csv_is_one_line(tmp_path):
    (tmp_path / "trials.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MiniCPMError, match="not a sweep's trials.csv"):
        read_sweep(tmp_path)
