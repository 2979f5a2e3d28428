"""Fault injection (issue 17), run in CI under the `faults` marker: a training run SIGKILLed at random steps resumes
to the same bytes, and so does a sweep SIGKILLed with its trials (its process group); every file of a checkpoint
damaged in every way is caught (the previous checkpoint is used, or a named one refused in one line), never trusted silently; a full disk is one line and leaves the previous checkpoint
intact. benchmarks/faults.py runs the same machinery at scale and prints the figures."""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path

import pytest

from minicpm.checkpoints.verify import newest_verified, resolve_verified
from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir

# runs by default (and in CI); `-m "not faults"` leaves it out, and so does the fast subset (`-m "not slow"`)
pytestmark = [pytest.mark.faults, pytest.mark.slow]

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks/faults.py"
_spec = importlib.util.spec_from_file_location("minicpm_faults_benchmark", BENCHMARK)
faults = sys.modules["minicpm_faults_benchmark"] = importlib.util.module_from_spec(_spec)  # dataclasses need it
_spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A tokenizer, a dataset, the recipe and an uninterrupted reference run (through the CLI)."""
    work = tmp_path_factory.mktemp("faults")
    tally = faults.Tally()
    recipe = faults.setup(work, tally)
    faults.minicpm(tally, "train", recipe, "--out", "ref", cwd=work, check=True)
    return work, recipe, faults.run_fingerprint(work / "ref")


def test_training_killed_at_random_steps_resumes_bit_identically(suite):
    work, recipe, reference = suite
    tally = faults.Tally()
    faults.kill_training(work, recipe, 2, random.Random(), tally, reference)
    assert tally.kills["training"] == [True, True] and tally.tracebacks == 0


@pytest.mark.parametrize("how", sorted(faults.DAMAGE))
def test_every_file_of_a_damaged_checkpoint_is_caught_and_the_previous_one_used(suite, tmp_path, how):
    work, _, _ = suite
    run = Path(shutil.copytree(work / "ref", tmp_path / "run"))
    newest = RunDir(run).latest_checkpoint()
    names = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert {"model.safetensors", "optimizer.pt", "config.json", "trainer_state.json"} <= set(names)
    for name in names:
        damaged = Path(shutil.copytree(run, tmp_path / f"case-{name}"))
        faults.DAMAGE[how](damaged / "checkpoints" / newest.name / name)
        warnings = []
        used, state = newest_verified(RunDir(damaged), warnings.append)
        assert used.name != newest.name and state["step"] == faults.TOTAL_STEPS - 2, name
        assert any(newest.name in w for w in warnings), (name, warnings)
        with pytest.raises(MiniCPMError) as error:  # named explicitly (--from): refused, no fallback
            resolve_verified(damaged / "checkpoints" / newest.name)
        assert "\n" not in str(error.value)


def test_a_full_disk_is_one_line_keeps_the_previous_checkpoint_and_resumes_bit_identically(suite):
    work, recipe, reference = suite
    tally = faults.Tally()
    faults.full_disk(work, recipe, tally, reference)
    assert tally.full_disk == {"one line, non-zero exit": True, "previous checkpoint intact": True,
                               "resume bit-identical": True}
    assert tally.tracebacks == 0


class FirstTrial:
    """Kill timing for kill_sweep: just after the first trial starts (1 of its lines seen), 0.75 s into training."""

    def randrange(self, start, stop):
        return start

    def uniform(self, low, high):
        return (low + high) / 2


def test_a_sweep_killed_with_its_trials_resumes_to_the_same_trials_and_runs(suite):
    work, recipe, _ = suite
    grid = faults.SWEEP_GRID[:2]
    tally = faults.Tally()
    spec = faults.write_sweep_spec(work, recipe, grid)
    faults.minicpm(tally, "sweep", spec, "--out", "sweep_ref", cwd=work, check=True)
    reference = faults.sweep_outcome(work / "sweep_ref")
    assert sorted(reference) == sorted(map(str, grid))
    assert {state for _, state, *_ in reference.values()} == {"complete"}
    assert all(fingerprint for *_, fingerprint in reference.values())
    faults.kill_sweep(work, recipe, 1, FirstTrial(), tally, reference, grid)
    assert tally.sweeps_interrupted == 1  # the kill hit a trial mid-run, and the resume re-ran it
    assert tally.kills["sweep (process group)"] == [True] and tally.tracebacks == 0


def test_tampering_with_what_a_resume_trusts_is_caught(suite, tmp_path):
    work, recipe, reference = suite
    tally = faults.Tally()
    faults.tampering(tmp_path, recipe, work / "ref", tally, reference)
    assert tally.tampering == {
        "trainer_state.json: step - 1": "fallback",
        "trainer_state.json: tokens + 1": "fallback",
        "trainer_state.json: manifest removed": "fallback",
        "trainer_state.json: manifest and digest removed, weights flipped": "warned",
        "trainer_state.json: manifest and digest removed, weights flipped (--strict)": "fallback",
        "config.yaml: optim.lr changed on --resume": "one line"}
    assert tally.tracebacks == 0


def test_no_command_writes_onto_its_input_or_a_directory_that_holds_something(suite):
    work, _, _ = suite
    tally = faults.Tally()
    faults.outputs(work, work / "ref", tally)
    assert tally.outputs and {outcome for outcome in tally.outputs.values()} == {"one line"}, tally.outputs
    assert tally.tracebacks == 0


def test_the_last_bad_inputs_are_one_line_and_leave_nothing_behind(suite):
    work, recipe, _ = suite
    tally = faults.Tally()
    faults.bad_input(work, recipe, work / "ref", tally)
    assert tally.bad_input and {outcome for outcome in tally.bad_input.values()} == {"one line"}, tally.bad_input
    assert tally.tracebacks == 0
