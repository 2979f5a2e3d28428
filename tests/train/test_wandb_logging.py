"""W&B logging (run.wandb, the wandb extra): offline by default, into RUN/wandb, the same records as metrics.jsonl.
Skipped where wandb is not installed."""

from __future__ import annotations

import json
import time

import pytest
from train_helpers import PatternData, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir
from minicpm.train.loop import train
from minicpm.train.metrics import MetricsWriter



def test_an_offline_wandb_run_holds_every_logged_value(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default, not the environment's doing
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path / "run", "run.wandb=true", "run.log_every=1", "schedule.total_steps=3",
                      "schedule.decay_start=2", "run.checkpoint_every=0")
    train(cfg, data=PatternData(cfg.schedule.resolve()))
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # W&B stores each value as its JSON text
    values = [json.dumps(r[key]).encode() for r in records for key in ("loss", "grad_norm", "eval_loss") if key in r]
    assert len(values) >= 6
    deadline = time.monotonic() + 120
    while True:  # wandb's service writes the file after finish() returns
        missing = [v for v in values if v not in files[0].read_bytes()]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing


def test_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(MiniCPMError, match=r"run.wandb needs the wandb package: pip install 'minicpm\[wandb\]'"):
        MetricsWriter(RunDir(tmp_path / "run"), wandb=True)
