"""Checkpoints are trusted only once their files match the SHA-256 manifest in trainer_state.json: a damaged one is
skipped with a warning naming it, the newest that verifies is used, and a checkpoint named explicitly must verify."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import PatternData, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir
from minicpm.train import checkpoint as ckpt
from minicpm.train.loop import train

# one intra-op thread throughout (the module's run too), so that a resumed run matches bitwise

SIX_STEPS = ("run.dtype=fp32", "schedule.total_steps=6", "schedule.decay_start=4", "run.checkpoint_every=3")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 6 steps with checkpoints at steps 3 and 6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
        cfg = tiny_config(tmp_path_factory.mktemp("run") / "run", *SIX_STEPS)
        try:
            return train(cfg, data=PatternData(cfg.schedule.resolve())).run_dir
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch):
    monkeypatch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
    return shutil.copytree(finished_run, tmp_path / "run")


def flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_trainer_state_records_sha256_of_every_other_file(finished_run):
    checkpoint = RunDir(finished_run).latest_checkpoint()
    files = json.loads((checkpoint / "trainer_state.json").read_text())["files"]
    assert set(files) >= {"model.safetensors", "config.json", "optimizer.pt"}
    assert "trainer_state.json" not in files
    assert ckpt.verify_checkpoint(checkpoint)["step"] == 6


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_and_resumes_bit_identically(run_copy, capsys):
    expected = {k: v.clone() for k, v in load_file(run_copy / "checkpoints/step_00000006/model.safetensors").items()}
    flip_byte(run_copy / "checkpoints/step_00000006/model.safetensors")
    cfg = tiny_config(run_copy, *SIX_STEPS)
    result = train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000006" in err and "SHA-256 differs" in err
    assert result.step == 6
    resumed = load_file(run_copy / "checkpoints/step_00000006/model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_no_checkpoint_verifying_is_one_line(run_copy):
    for step in (3, 6):
        (run_copy / f"checkpoints/step_0000000{step}/optimizer.pt").write_bytes(b"truncated")
    cfg = tiny_config(run_copy, *SIX_STEPS)
    with pytest.raises(MiniCPMError, match="none of its 2 checkpoint") as error:
        train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    assert "\n" not in str(error.value) and "optimizer.pt" in str(error.value)


def test_an_explicitly_named_checkpoint_that_fails_is_one_line_without_fallback(run_copy, tmp_path):
    named = run_copy / "checkpoints/step_00000006"
    (named / "config.json").unlink()
    with pytest.raises(MiniCPMError, match="config.json: missing"):
        ckpt.resolve_verified(named)
    # the run directory (not a named checkpoint) falls back to step 3
    assert ckpt.resolve_verified(run_copy)[0].name == "step_00000003"


def test_a_bad_latest_pointer_is_reported_and_the_newest_verifying_checkpoint_used(run_copy):
    (run_copy / "checkpoints/latest").write_bytes(b"\xff\xfe../../etc")
    warnings = []
    checkpoint, state = ckpt.newest_verified(RunDir(run_copy), warnings.append)
    assert checkpoint.name == "step_00000006" and state["step"] == 6
    assert len(warnings) == 1 and "latest" in warnings[0]


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a readable optimizer state"),
    (lambda p: p.unlink(), "optimizer.pt: missing"),
    (lambda p: p.write_bytes(b"garbage"), "not a readable optimizer state"),
])
def test_an_unreadable_optimizer_state_without_a_manifest_is_one_line(run_copy, damage, expected):
    checkpoint = run_copy / "checkpoints/step_00000006"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["files"]  # as a checkpoint written before manifests: only the reader stands between
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    damage(checkpoint / "optimizer.pt")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(MiniCPMError, match=expected) as error:
        ckpt.load_optimizer(checkpoint, optimizer)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value, expected", [("step", -3, "step is -3"), ("step", "6", "step must be")])
def test_a_trainer_state_of_the_wrong_type_or_range_is_one_line(run_copy, field, value, expected):
    checkpoint = run_copy / "checkpoints/step_00000006"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state[field] = value
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(MiniCPMError, match=expected):
        ckpt.resolve_verified(checkpoint)


def test_a_weights_only_start_or_an_export_of_a_damaged_checkpoint_is_one_line(run_copy):
    from minicpm.model.transformer import MiniCPM

    named = run_copy / "checkpoints/step_00000006"
    flip_byte(named / "model.safetensors")
    model = MiniCPM(ckpt.source_model_config(named))
    with pytest.raises(MiniCPMError, match="model.safetensors: SHA-256 differs"):
        ckpt.load_weights_only(named, model)
    with pytest.raises(MiniCPMError, match="SHA-256 differs"):
        ckpt.consolidate(named)
    # a weights-only start from the run directory takes its newest checkpoint that verifies
    assert ckpt.resolve_verified_weights(run_copy).name == "step_00000003"
