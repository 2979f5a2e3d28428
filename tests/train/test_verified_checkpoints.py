"""Checkpoints are trusted only once their files match the SHA-256 manifest in trainer_state.json: a damaged one is
skipped with a warning naming it, the newest that verifies is used, and a checkpoint named explicitly must verify."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import PatternData, tiny_config

from minicpm.checkpoints.verify import newest_verified, resolve_verified, resolve_verified_weights, verify_checkpoint
from minicpm.checkpoints.weights import consolidate, source_model_config
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
    assert verify_checkpoint(checkpoint)["step"] == 6


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
        resolve_verified(named)
    # the run directory (not a named checkpoint) falls back to step 3
    assert resolve_verified(run_copy)[0].name == "step_00000003"


def test_a_bad_latest_pointer_is_reported_and_the_newest_verifying_checkpoint_used(run_copy):
    (run_copy / "checkpoints/latest").write_bytes(b"\xff\xfe../../etc")
    warnings = []
    checkpoint, state = newest_verified(RunDir(run_copy), warnings.append)
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
        resolve_verified(checkpoint)


def test_a_weights_only_start_or_an_export_of_a_damaged_checkpoint_is_one_line(run_copy):
    from minicpm.model.transformer import MiniCPM

    named = run_copy / "checkpoints/step_00000006"
    flip_byte(named / "model.safetensors")
    model = MiniCPM(source_model_config(named))
    with pytest.raises(MiniCPMError, match="model.safetensors: SHA-256 differs"):
        ckpt.load_weights_only(named, model)
    with pytest.raises(MiniCPMError, match="SHA-256 differs"):
        consolidate(named)
    # a weights-only start from the run directory takes its newest checkpoint that verifies
    assert resolve_verified_weights(run_copy).name == "step_00000003"


def edit_state(checkpoint, **changes):
    """Rewrite trainer_state.json with `changes` (a key set to None is deleted), as a hand edit would."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}, indent=1))


def test_an_edited_step_in_the_trainer_state_is_caught_and_the_resume_ends_bit_identically(run_copy, capsys):
    expected = {k: v.clone() for k, v in load_file(run_copy / "checkpoints/step_00000006/model.safetensors").items()}
    newest = run_copy / "checkpoints/step_00000006"
    edit_state(newest, step=5)  # the manifest still matches every other file: only the state's digest sees this
    with pytest.raises(MiniCPMError, match="differ from its state_sha256") as error:
        resolve_verified(newest)
    assert "\n" not in str(error.value)
    cfg = tiny_config(run_copy, *SIX_STEPS)
    result = train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000006" in err and "state_sha256" in err
    assert result.step == 6  # resumed at step 3, not at the edited 5: no extra or missing step
    resumed = load_file(run_copy / "checkpoints/step_00000006/model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_a_checkpoint_without_its_manifest_is_a_warning_naming_it_and_strict_refuses_it(run_copy):
    newest = run_copy / "checkpoints/step_00000006"
    edit_state(newest, files=None, state_sha256=None)
    flip_byte(newest / "model.safetensors")
    warnings = []
    used, _ = newest_verified(RunDir(run_copy), warnings.append)
    assert used == newest  # trusted, as a checkpoint from before manifests is...
    assert len(warnings) == 1 and str(newest / "trainer_state.json") in warnings[0]  # ...but never silently
    assert "no file manifest" in warnings[0] and "--strict" in warnings[0]
    with pytest.raises(MiniCPMError, match="no file manifest.*refused") as error:
        resolve_verified(newest, strict=True)
    assert "\n" not in str(error.value)
    warnings.clear()
    used, state = newest_verified(RunDir(run_copy), warnings.append, strict=True)  # the previous one verifies
    assert used.name == "step_00000003" and state["step"] == 3
    assert any("skipping checkpoint step_00000006" in w and "refused" in w for w in warnings)


def test_a_checkpoint_written_before_state_digests_warns_that_its_state_is_not_verified(run_copy):
    newest = run_copy / "checkpoints/step_00000006"
    edit_state(newest, state_sha256=None)  # files still listed: the weights are checked, the state cannot be
    warnings = []
    assert verify_checkpoint(newest, warn=warnings.append)["step"] == 6
    assert len(warnings) == 1 and "no digest (state_sha256)" in warnings[0] and "trainer state" in warnings[0]
    flip_byte(newest / "model.safetensors")
    with pytest.raises(MiniCPMError, match="SHA-256 differs"):
        verify_checkpoint(newest, warn=warnings.append)


def test_strict_training_resumes_from_the_newest_checkpoint_with_a_manifest(run_copy, capsys):
    edit_state(run_copy / "checkpoints/step_00000006", files=None, state_sha256=None)
    cfg = tiny_config(run_copy, *SIX_STEPS, "run.strict_checkpoints=true")
    result = train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    assert "resuming" in capsys.readouterr().out and result.step == 6
    assert "state_sha256" in (run_copy / "checkpoints/step_00000006/trainer_state.json").read_text()  # rewritten


def test_resuming_with_a_changed_config_is_refused_naming_the_keys(run_copy):
    import shutil as sh

    sh.rmtree(run_copy / "checkpoints/step_00000006")  # resume at step 3
    recorded = (run_copy / "config.yaml").read_bytes()
    cfg = tiny_config(run_copy, *SIX_STEPS, "optim.lr=0.02", "optim.beta2=0.9")
    with pytest.raises(MiniCPMError, match=r"optim.beta2 0.95 -> 0.9; optim.lr 0.01 -> 0.02.*--allow-config-change") \
            as error:
        train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()))
    assert "\n" not in str(error.value)
    assert (run_copy / "config.yaml").read_bytes() == recorded  # nothing rewritten
    assert not (run_copy / "config_changes.jsonl").exists()
    # settings that change no number the run computes may change on a resume
    cfg = tiny_config(run_copy, *SIX_STEPS, "run.keep_last=1", "run.checkpoint_every=2")
    assert train(cfg, resume=True, data=PatternData(cfg.schedule.resolve())).step == 6


def test_an_allowed_config_change_is_recorded_with_the_step_it_took_effect(run_copy):
    import shutil as sh

    sh.rmtree(run_copy / "checkpoints/step_00000006")
    cfg = tiny_config(run_copy, *SIX_STEPS, "optim.lr=0.02")
    train(cfg, resume=True, data=PatternData(cfg.schedule.resolve()), allow_config_change=True)
    changes = [json.loads(line) for line in (run_copy / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 3, "changes": {"optim.lr": {"from": 0.01, "to": 0.02}}}]
    assert "lr: 0.02" in (run_copy / "config.yaml").read_text()
