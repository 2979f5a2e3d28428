"""The quickstart, scaled down to seconds: every step runs and the summary holds what the README promises."""

import json
from fractions import Fraction

import pytest

from minicpm.data.prepare import is_held_out
from minicpm.data.stdlib_corpus import holdout_order, split_into_pieces
from minicpm.demos.quickstart import Recipe, run_quickstart


SMALL = Recipe(vocab_size=400, decay_steps=2, file_stride=40, overrides=(
    "model.hidden_size=64", "model.intermediate_size=160", "model.num_hidden_layers=2", "model.num_attention_heads=1",
    "model.num_key_value_heads=1", "batch.seq_len=64", "batch.tokens_per_step=1024", "batch.micro_batch_size=8",
    "schedule.total_steps=8", "schedule.warmup_steps=2", "run.eval_every=4", "run.checkpoint_every=4",
    "data.eval_sequences=4"))


@pytest.mark.slow
def test_quickstart_runs_every_step_and_reports_the_decay(tmp_path, capsys):
    summary = run_quickstart(tmp_path / "qs", device="cpu", recipe=SMALL)
    out = capsys.readouterr().out
    for where in ("tokenizer/tokenizer.json", "data/library", "runs/stable", "runs/decay-from-4", "runs/decay-from-8",
                  "report/report.html", "summary.json"):
        assert str(tmp_path / "qs" / where) in out
        assert (tmp_path / "qs" / where).exists()
    assert "the decay took off" in out and "minicpm generate" in out
    # the decay branched from the end of the stable run lowers the held-out loss below where the stable run stopped
    assert summary["decayed_eval_loss"] < summary["stable_eval_loss"]
    assert summary["decayed_eval_bpb"] < summary["stable_eval_bpb"]
    assert len(summary["samples"]) == 3
    assert json.loads((tmp_path / "qs/summary.json").read_text())["decayed_eval_loss"] == summary["decayed_eval_loss"]
    branch = (tmp_path / "qs/runs/decay-from-8/config.yaml").read_text()
    assert "kind: wsd" in branch and "total_steps: 10" in branch and "library: 0.8" in branch

    again = run_quickstart(tmp_path / "qs", device="cpu", recipe=SMALL)  # everything is there: picks it all up
    assert again["decayed_eval_loss"] == summary["decayed_eval_loss"]


def test_files_are_cut_at_blank_lines_into_pieces_of_a_minimum_size():
    text = "\n\n".join(f"def f{i}():\n    return {i}" for i in range(100))
    pieces = split_into_pieces(text, min_chars=200)
    assert "\n\n".join(pieces) == text
    assert all(len(p) >= 200 for p in pieces[:-1])


def test_held_out_positions_take_whole_files():
    files = [[f"file{f}-piece{i}" for i in range(n)] for f, n in enumerate([3, 5, 2, 7, 4, 6, 1, 8, 2, 9] * 5)]
    fraction = Fraction(1, 10)
    order = holdout_order(files, fraction, seed=0)
    assert sorted(order) == sorted(p for pieces in files for p in pieces)
    held = {p.split("-")[0] for i, p in enumerate(order) if is_held_out(i, fraction)}
    trained = {p.split("-")[0] for i, p in enumerate(order) if not is_held_out(i, fraction)}
    assert len(held & trained) <= 1  # only the last file drawn may straddle
