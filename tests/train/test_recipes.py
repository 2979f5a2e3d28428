"""The recipes as the authors ran them: SFT starts at the LR where its source run's decay ended (optim.lr_from_source,
the authors' SFT, OpenBMB/MiniCPM#40; configs/sft.yaml asks for it), and the 1.2B recipe ramps its batch 2M -> 4M."""

from __future__ import annotations

import pytest
import yaml
from train_helpers import PatternData, metrics_without_timing, tiny_config

from minicpm.optim.schedule import wsd_schedule
from minicpm.train.config import load_config
from minicpm.train.loop import train


def test_fine_tuning_starts_at_the_lr_where_the_source_decay_ended(tmp_path, capsys):
    source_cfg = tiny_config(tmp_path / "base", "optim.lr=0.02", "schedule.decay=linear", "schedule.floor=0.31")
    train(source_cfg, data=PatternData(source_cfg.schedule.resolve()))
    # the source's last update (step 12) ran at schedule(11): linear decay from step 8 over 4 steps to 0.31
    ended = 0.02 * wsd_schedule(11, warmup_steps=2, decay_start=8, decay_steps=4, decay="linear", floor=0.31)
    assert ended == 0.02 * 0.31
    sft = tiny_config(tmp_path / "sft", f"run.init_weights_from={tmp_path / 'base'}", "optim.lr=0.001",
                      "optim.lr_from_source=true", "schedule.warmup_steps=0", "schedule.decay_start=0",
                      "schedule.floor=0.1", "schedule.total_steps=4", "run.log_every=1")
    train(sft, data=PatternData(sft.schedule.resolve()))
    assert load_config(tmp_path / "sft/config.yaml").optim.lr == ended  # the run records the LR it used
    first = metrics_without_timing(tmp_path / "sft")[0]
    assert first["lr"] == ended * sft.schedule.resolve()(0)
    assert "where the source's schedule ended" in capsys.readouterr().out


def test_without_a_source_schedule_the_run_starts_at_optim_lr(tmp_path):
    cfg = tiny_config(tmp_path / "run", "optim.lr=0.003", "optim.lr_from_source=true", "schedule.total_steps=2",
                      "run.log_every=1", "schedule.warmup_steps=0", "schedule.decay_start=0")
    train(cfg, data=PatternData(cfg.schedule.resolve()))  # no run.init_weights_from: nothing to read
    assert load_config(tmp_path / "run/config.yaml").optim.lr == 0.003


def test_the_sft_recipe_starts_where_the_decay_ended():
    from pathlib import Path

    import minicpm

    recipe = yaml.safe_load((Path(minicpm.__file__).parent / "configs/sft.yaml").read_text())
    assert recipe["optim"]["lr_from_source"] is True


def test_the_1_2b_recipe_ramps_its_batch_from_2m_to_4m_tokens():
    from pathlib import Path

    import minicpm
    from minicpm.train.batch_ramp import batch_ramp

    cfg = load_config(Path(minicpm.__file__).parent / "configs/minicpm-1.2b.yaml")
    ramp = batch_ramp(cfg.batch)
    assert ramp.tokens_per_step(0) == 2 * 1024 ** 2 and ramp.tokens_per_step(cfg.schedule.total_steps - 1) == 4 * 1024 ** 2
    assert ramp.stages == ((10000, 2 * 1024 ** 2),)
    assert ramp.tokens_before(cfg.schedule.total_steps) == pytest.approx(1.1e12, rel=0.01)  # still ~1.1T tokens
