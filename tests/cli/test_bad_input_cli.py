"""Issue 16's bad inputs through the command line: an unknown lm-eval task, a GGUF type or model the export
cannot hold, an empty prompt: each is one line on stderr and exit 2."""

from __future__ import annotations

import dataclasses

import pytest

from minicpm.interop.initialise import init_checkpoint
from minicpm.model.config import preset


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    dense = init_checkpoint(preset("tiny"), root / "dense")
    # llama.cpp has no dynamic NTK: a model with it has no place in a GGUF
    dynamic = init_checkpoint(dataclasses.replace(preset("tiny"), rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                              root / "dynamic")
    return dense, dynamic


def assert_one_line(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("tasks, fragment", [
    # lm-eval indexes its thousands of task files before it can say a name is unknown
    pytest.param("no_such_task", "unknown task 'no_such_task'", marks=pytest.mark.slow),
    ("", "--tasks: no task named"),
])
def test_an_unknown_or_missing_task_is_one_line(cli, checkpoints, tasks, fragment):
    assert_one_line(cli("eval", "tasks", checkpoints[0], "--tasks", tasks), fragment)


def test_a_gguf_type_the_export_does_not_write_is_one_line(cli, checkpoints, tmp_path):
    result = cli("export", checkpoints[0], tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", "q4_0")
    assert_one_line(result, "--gguf-type: invalid choice: 'q4_0'")
    assert not (tmp_path / "m.gguf").exists()


def test_a_model_the_gguf_architecture_cannot_hold_is_one_line(cli, checkpoints, tmp_path):
    result = cli("export", checkpoints[1], tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", "q8_0")
    assert_one_line(result, "rope_scaling type 'dynamic' does not export to GGUF yet")
    assert not (tmp_path / "m.gguf").exists()


def test_an_empty_prompt_is_one_line(cli, checkpoints):
    result = cli("generate", checkpoints[0], "--prompt=", "--max-new-tokens", "2")
    assert_one_line(result, "prompt 0 is empty")
