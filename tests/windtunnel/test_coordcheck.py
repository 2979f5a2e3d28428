"""`minicpm coordcheck`: μP passes and SP fails on CPU; a broken μP makes the command exit 1."""

import json

import pytest

from minicpm.cli import main
from minicpm.optim import mup


WIDTHS = ["32", "64", "128", "256"]


@pytest.mark.slow
def test_coordcheck_passes_mup_fails_sp_and_draws_the_plot(tmp_path, capsys):
    assert main(["coordcheck", "--widths", *WIDTHS, "--steps", "3", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("μP: width-stable") and lines[1].startswith("SP: NOT width-stable")
    assert (tmp_path / "coordcheck.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "coordcheck.json").read_text())
    assert record["verdicts"]["mup"]["stable"] and not record["verdicts"]["sp"]["stable"]
    sp = record["scales"]["sp"]  # under SP the residual stream grows with width; under μP it stays put
    assert sp["256"]["residual"][-1] > 4 * sp["32"]["residual"][-1]
    mu = record["scales"]["mup"]
    assert 0.5 < mu["256"]["residual"][-1] / mu["32"]["residual"][-1] < 2
    assert set(mu["32"]) == {"embedding", "attn", "mlp", "residual", "logits"} and len(mu["32"]["logits"]) == 4


def test_coordcheck_exits_1_when_mup_is_broken(tmp_path, capsys, monkeypatch):
    def unscaled(model, **kwargs):  # the hidden matrices' learning rate no longer divided by the width
        groups = param_groups(model, **kwargs)
        for g in groups:
            g["lr"] = kwargs["lr"]
        return groups

    param_groups = mup.param_groups
    monkeypatch.setattr(mup, "param_groups", unscaled)
    assert main(["coordcheck", "--widths", *WIDTHS, "--steps", "3", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().out.startswith("μP: NOT width-stable")


@pytest.mark.parametrize("args, message", [
    (["--widths", "64"], "at least two widths"),
    (["--widths", "64", "100"], "100 is not a positive multiple of the head size 16"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_coordcheck_bad_arguments(tmp_path, capsys, args, message):
    assert main(["coordcheck", *args, "--out", str(tmp_path / "cc")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cc").exists()
