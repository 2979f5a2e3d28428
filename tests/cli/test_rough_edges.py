"""The last rough edges of bad input (issue 26, part 3): each is one line naming the thing at fault, exit 2, and
nothing left behind (no output directory, no run directory holding only a lock, no lock in an input run)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from train_helpers import PatternData, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.interop.initialise import init_checkpoint
from minicpm.model.config import preset
from minicpm.train.loop import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_checkpoint(preset("tiny"), tmp_path_factory.mktemp("edges") / "model")


def assert_one_line(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_a_generation_longer_than_memory_holds_is_refused_before_it_allocates(cli, model_dir):
    result = cli("generate", model_dir, "--prompt", "hello", "--max-new-tokens", 10**11)
    assert_one_line(result, "max_new_tokens 100,000,000,000", "GB", "512 positions")


@pytest.mark.parametrize("option, fragment", [(("--batch-size", 0), "--batch-size 0"),
                                              (("--dtype", "fp7"), "--dtype 'fp7'")])
def test_dpo_precompute_ref_refuses_a_bad_batch_size_or_dtype(cli, model_dir, tmp_path, option, fragment):
    assert_one_line(cli("dpo", "precompute-ref", model_dir, "--data", tmp_path / "pairs", *option), fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("schedule.half_life=.nan", "schedule.half_life must be a finite number"),
    ("schedule.decay_steps=100", "schedule.decay_steps must be in [0, total_steps=30], got 100"),
])
def test_a_non_finite_or_out_of_range_setting_is_refused_before_a_run_directory_exists(cli, tmp_path, override,
                                                                                        fragment):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny}\nschedule: {total_steps: 30}\n")
    result = cli("train", recipe, override, "--out", tmp_path / "run")
    assert_one_line(result, fragment)
    assert not (tmp_path / "run").exists()


def test_a_section_that_is_not_a_mapping_is_named(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: [1, 2]\n")
    assert_one_line(cli("train", recipe, "--out", tmp_path / "run"), "model must be a mapping", "[1, 2]")
    assert "Merge error" not in cli("train", recipe, "--out", tmp_path / "run").stderr


def test_importing_a_model_with_nan_weights_is_refused(cli, model_dir, tmp_path):
    source = Path(shutil.copytree(model_dir, tmp_path / "nan"))
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert_one_line(cli("import", source, tmp_path / "out"), "model.norm.weight holds NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_info_refuses_a_negative_sequence_length(cli):
    assert_one_line(cli("info", "tiny", "--seq-len", -1), "--seq-len -1")


def test_prepare_blames_shard_tokens_for_a_zero_shard_size(cli, datasets, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha beta gamma\n")
    result = cli("prepare", corpus, "--tokenizer", datasets[0], "--out", tmp_path / "out", "--shard-tokens", 0)
    assert_one_line(result, "--shard-tokens 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_reversed_learning_rate_range_starts_nothing(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny}\n")
    result = cli("windtunnel", "lr-transfer", recipe, "--widths", 64, "--log2-lr", -3, -9, "--out", tmp_path / "wt")
    assert_one_line(result, "--log2-lr -3 -9: FROM must not exceed TO")
    assert not (tmp_path / "wt").exists()


def test_eval_loss_of_a_binary_file_names_the_file(cli, model_dir, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    assert_one_line(cli("eval", "loss", model_dir, "--text", binary), f"--text {binary}: not UTF-8 text")


def test_chat_names_a_bad_temperature_and_a_short_context_gets_an_answer_length_that_fits(cli, model_dir, tmp_path):
    from minicpm.infer.chat import open_session

    assert_one_line(cli("chat", model_dir, "--temperature", -1), "temperature -1.0")
    short = init_checkpoint(dataclasses.replace(preset("tiny"), max_position_embeddings=256), tmp_path / "short")
    session = open_session(short)
    assert session.max_new_tokens == 128  # the default 256 could never fit 256 positions with a prompt
    assert len(session.prompt_ids([{"role": "user", "content": "hello"}])) > 0
    with pytest.raises(MiniCPMError, match="--max-new-tokens 256: must be in"):
        open_session(short, max_new_tokens=256)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
        cfg = tiny_config(tmp_path_factory.mktemp("run") / "run", "run.dtype=fp32", "schedule.total_steps=4",
                          "schedule.decay_start=3", "run.checkpoint_every=2")
        return train(cfg, data=PatternData(cfg.schedule.resolve())).run_dir


def test_a_refused_branch_leaves_no_run_directory_behind(finished_run, tmp_path, monkeypatch):
    monkeypatch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
    out = tmp_path / "branch"
    cfg = tiny_config(out, "run.dtype=fp32", "schedule.total_steps=4", "schedule.decay_start=3",
                      f"run.init_from={finished_run}")
    with pytest.raises(MiniCPMError, match="nothing to train"):
        train(cfg, data=PatternData(cfg.schedule.resolve()))
    assert not out.exists()


def test_a_refused_resume_writes_no_lock_into_the_run(finished_run, tmp_path, monkeypatch):
    monkeypatch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run / ".lock").unlink(missing_ok=True)
    before = sorted(p.name for p in run.iterdir())
    cfg = tiny_config(run, "run.dtype=fp32", "schedule.total_steps=4", "schedule.decay_start=3", "optim.lr=0.5")
    with pytest.raises(MiniCPMError, match="changed config"):
        train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_report_refused_for_a_bad_prediction_leaves_no_directory(cli, finished_run, tmp_path):
    bad = tmp_path / "prediction.json"
    bad.write_text(json.dumps({"kind": "nonsense"}))
    result = cli("report", finished_run, "--out", tmp_path / "report", "--prediction", bad)
    assert_one_line(result, str(bad))
    assert not (tmp_path / "report").exists()
