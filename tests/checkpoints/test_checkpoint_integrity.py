"""Checkpoint manifests (SHA-256 and size of every file) and the trainer_state.json schema, checked on a real
checkpoint of a tiny run."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil

import pytest
import torch
from train_helpers import PatternData, tiny_config

from minicpm.errors import MiniCPMError
from minicpm.checkpoints.integrity import CHUNK_BYTES, file_digests, sha256_file, verify_digests
from minicpm.checkpoints.state_schema import check_trainer_state
from minicpm.train.loop import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint directory written by the trainer (3 steps of the tiny model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # MFU's peak is measured with 2048^3 bf16 matmuls, minutes on a busy CPU; no test here reads MFU
            patch.setattr("minicpm.train.loop.device_peak_flops", lambda *args: 1e12)
            cfg = tiny_config(tmp_path_factory.mktemp("run") / "run", "schedule.total_steps=3",
                              "schedule.decay_start=2")
            return train(cfg, data=PatternData(cfg.schedule.resolve())).checkpoint
    finally:
        torch.set_num_threads(threads)


def assert_one_line(error, *parts):
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


# ------------------------------------------------------------------------------------------ manifests

def test_digests_list_every_file_with_its_size_and_sha256_in_sorted_order(copy_of):
    (copy_of / "dcp").mkdir()
    (copy_of / "dcp" / ".metadata").write_bytes(b"shard metadata")
    (copy_of / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 10)
    digests = file_digests(copy_of, exclude=("trainer_state.json",))
    on_disk = sorted(p.relative_to(copy_of).as_posix() for p in copy_of.rglob("*") if p.is_file())
    assert list(digests) == [name for name in on_disk if name != "trainer_state.json"]
    assert {"model.safetensors", "optimizer.pt", "config.json", "dcp/.metadata", "dcp/__0_0.distcp"} <= set(digests)
    for name, entry in digests.items():
        data = (copy_of / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    verify_digests(copy_of, digests)  # the untouched directory verifies


def test_streamed_hash_of_a_file_over_several_chunks_equals_hashlib(tmp_path):
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


def test_a_flipped_byte_is_named(copy_of):
    digests = file_digests(copy_of)
    weights = copy_of / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(MiniCPMError) as error:
        verify_digests(copy_of, digests)
    assert_one_line(error, str(weights), "SHA-256 differs")


def test_a_truncated_file_is_named_before_any_file_is_hashed(copy_of, monkeypatch):
    digests = file_digests(copy_of)
    optimizer = copy_of / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    monkeypatch.setattr("minicpm.checkpoints.integrity.sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(MiniCPMError) as error:
        verify_digests(copy_of, digests)
    assert_one_line(error, str(optimizer), "100 bytes", str(digests["optimizer.pt"]["bytes"]))


def test_a_missing_file_is_named(copy_of):
    digests = file_digests(copy_of)
    (copy_of / "config.json").unlink()
    with pytest.raises(MiniCPMError) as error:
        verify_digests(copy_of, digests)
    assert_one_line(error, str(copy_of / "config.json"), "missing")


@pytest.mark.parametrize("manifest, expected", [
    ([], "expected a mapping"),
    ({"config.json": "abc"}, "not a mapping"),
    ({"config.json": {"sha256": "XYZ", "bytes": 1}}, "64 lowercase hex"),
    ({"config.json": {"sha256": "0" * 64, "bytes": -1}}, "integer >= 0"),
    ({"config.json": {"sha256": "0" * 64, "bytes": True}}, "integer >= 0"),
    ({"../outside": {"sha256": "0" * 64, "bytes": 1}}, "points outside"),
])
def test_a_malformed_manifest_is_one_line(copy_of, manifest, expected):
    with pytest.raises(MiniCPMError) as error:
        verify_digests(copy_of, manifest, source="trainer_state.json")
    assert_one_line(error, "trainer_state.json", expected)


def test_a_symbolic_link_in_a_checkpoint_is_refused(copy_of, tmp_path):
    (tmp_path / "elsewhere").write_text("x")
    (copy_of / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MiniCPMError) as error:
        file_digests(copy_of)
    assert_one_line(error, str(copy_of / "link"), "symbolic link")


# ------------------------------------------------------------------------------------------ trainer_state.json

def real_state(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_the_trainer_state_a_run_writes_passes_the_schema(checkpoint):
    state = real_state(checkpoint)
    assert check_trainer_state(state, checkpoint / "trainer_state.json", total_steps=3) == state
    with_files = {**state, "files": file_digests(checkpoint, exclude=("trainer_state.json",))}
    assert check_trainer_state(with_files, "trainer_state.json")["files"] == with_files["files"]


def mutate(state, field, value):
    state = copy.deepcopy(state)
    target, *path = field.split(".")
    if not path:
        if value is KeyError:
            del state[target]
        else:
            state[target] = value
        return state
    node = state[target]
    for key in path[:-1]:
        node = node[int(key) if isinstance(node, list) else key]
    last = int(path[-1]) if isinstance(node, list) else path[-1]
    node[last] = value
    return state


@pytest.mark.parametrize("field, value, expected", [
    ("step", -1, "step is -1"),
    ("step", "12", "step must be an integer"),
    ("step", 1.5, "step must be an integer"),
    ("step", True, "step must be an integer"),
    ("step", KeyError, "no 'step' field"),
    ("tokens", -5, "tokens is -5"),
    ("bad_steps", None, "bad_steps must be an integer"),
    ("world_size", 0, "world_size is 0"),
    ("data", [], "data must be an object"),
    ("interval", 3, "interval must be an object"),
    ("interval.sums.loss", "nan", "interval.sums.loss must be a finite number"),
    ("interval.sums", [], "interval.sums must be an object"),
    ("interval.sums.loss", float("inf"), "interval.sums.loss must be a finite number"),
    ("interval.steps", -1, "interval.steps is -1"),
    ("interval.surprise", 1, "interval.surprise is not one of"),
    ("rng", "seed", "rng must be an object"),
    ("rng.python", [3, [], None], "rng.python must be"),
    ("rng.python.1.5", -1, "rng.python[1][5]"),
    ("rng.numpy.0", "PCG64", "rng.numpy must be"),
    ("rng.numpy.2", 700, "rng.numpy[2] is 700"),
    ("rng.torch", "not base64!", "rng.torch is not valid base64"),
    ("rng.torch", "AAAA", "rng.torch is not a CPU generator state"),
    ("rng.cuda", "AAAA", "rng.cuda must be a list"),
    ("schedule", 5, "schedule must be a string"),
    ("files", {"model.safetensors": {"sha256": "0", "bytes": 1}}, "files: entry 'model.safetensors'"),
])
def test_a_wrong_type_or_range_names_the_file_and_field(checkpoint, field, value, expected):
    path = checkpoint / "trainer_state.json"
    with pytest.raises(MiniCPMError) as error:
        check_trainer_state(mutate(real_state(checkpoint), field, value), path)
    assert_one_line(error, str(path), expected)


def test_a_step_beyond_the_schedule_and_a_non_object_are_refused(checkpoint):
    with pytest.raises(MiniCPMError) as error:
        check_trainer_state(real_state(checkpoint), "ts.json", total_steps=2)
    assert_one_line(error, "ts.json: step 3 is beyond schedule.total_steps 2")
    with pytest.raises(MiniCPMError) as error:
        check_trainer_state([1, 2], "ts.json")
    assert_one_line(error, "ts.json: expected a JSON object, got list")
