"""DCP shards are read without running code from the checkpoint: the allow-list unpickler and the safe reader."""

from __future__ import annotations

import builtins
import dataclasses
import os
import pickle
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minicpm.errors import MiniCPMError
from minicpm.model.config import preset
from minicpm.model.transformer import MiniCPM
from minicpm.checkpoints.safe_dcp import SafeFileSystemReader, load_dcp, read_dcp_metadata

# one process saving and loading DCP shards is intended here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def trained_model(seed):
    torch.manual_seed(seed)
    model = MiniCPM(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 8))
    model.hidden_states(ids).pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def dcp_state(model, optimizer):
    """What checkpoint.py saves with DCP: weights and optimizer moments, tensors only."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state["state"]}, optim_state


def save_shards(directory):
    model, optimizer = trained_model(seed=0)
    dcp.save(dcp_state(model, optimizer)[0], checkpoint_id=directory)
    return model, optimizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "dcp"
    model, optimizer = save_shards(directory)
    return directory, model, optimizer


def copy_shards(shards, tmp_path):
    directory = tmp_path / "dcp"
    directory.mkdir()
    for f in shards.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    return directory


class Payload:
    """Pickles as a call of `func(*args)`: what a crafted .metadata would hold."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
    }


def assert_one_line(error, *parts):
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


@pytest.mark.slow
def test_a_real_dcp_checkpoint_loads_through_the_safe_reader_with_identical_tensors(shards):
    directory, saved_model, saved_optimizer = shards
    saved = dcp_state(saved_model, saved_optimizer)[0]
    for load in ("load_dcp", "storage_reader"):
        model, optimizer = trained_model(seed=1)  # other weights, other moments
        state, optim_state = dcp_state(model, optimizer)
        assert not torch.equal(state["model"]["model.embed_tokens.weight"], saved["model"]["model.embed_tokens.weight"])
        if load == "load_dcp":
            load_dcp(state, directory, no_dist=True)
        else:
            dcp.load(state, storage_reader=SafeFileSystemReader(directory), no_dist=True)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict={**optim_state, "state": state["optimizer"]})
        for name, tensor in saved_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
        loaded = dcp_state(model, optimizer)[0]["optimizer"]
        for name, moments in saved["optimizer"].items():
            for key, value in moments.items():
                assert torch.equal(loaded[name][key], value), (name, key)


def test_metadata_of_real_shards_is_read_with_every_tensor_entry(shards):
    directory, model, _ = shards
    metadata = read_dcp_metadata(directory)
    assert read_dcp_metadata(directory / ".metadata").state_dict_metadata.keys() == metadata.state_dict_metadata.keys()
    for name, tensor in model.state_dict().items():
        entry = metadata.state_dict_metadata[f"model.{name}"]
        assert entry.size == tensor.shape and entry.properties.dtype == tensor.dtype


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.call"])
def test_a_malicious_metadata_runs_nothing_and_is_refused_in_one_line(shards, tmp_path, kind):
    directory = copy_shards(shards[0], tmp_path)
    marker = tmp_path / "pwned"
    crafted = pickle.dumps(payloads(marker)[kind])
    (directory / ".metadata").write_bytes(crafted)
    forbidden = {"os.system": "system", "builtins.exec": "builtins.exec", "subprocess.call": "subprocess.call"}[kind]

    with pytest.raises(MiniCPMError) as error:
        read_dcp_metadata(directory)
    assert_one_line(error, str(directory / ".metadata"), forbidden, "refused")
    model, optimizer = trained_model(seed=1)
    with pytest.raises(MiniCPMError) as error:
        load_dcp(dcp_state(model, optimizer)[0], directory, no_dist=True)
    assert_one_line(error, forbidden)
    with pytest.raises(BaseException):  # DCP itself, given the reader: it wraps the refusal in its own errors
        dcp.load(dcp_state(model, optimizer)[0], storage_reader=SafeFileSystemReader(directory), no_dist=True)
    assert not marker.exists()

    pickle.loads(crafted)  # the payload is real: plain pickle, as DCP's own reader uses, runs it
    assert marker.exists()


def test_a_payload_hidden_inside_real_metadata_is_refused(shards, tmp_path):
    directory = copy_shards(shards[0], tmp_path)
    marker = tmp_path / "pwned"
    metadata = read_dcp_metadata(directory)
    metadata.storage_meta.modules = [payloads(marker)["os.system"]]
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(MiniCPMError) as error:
        read_dcp_metadata(directory)
    assert_one_line(error, "system", "refused")
    assert not marker.exists()


def test_a_weight_turned_into_a_pickled_object_is_refused(shards, tmp_path):
    """A .metadata of allowed classes only can still declare an entry as bytes, which DCP's planner would
    torch.load with weights_only=False: the checker refuses such entries."""
    directory = copy_shards(shards[0], tmp_path)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(payloads(marker)["os.system"])
    (directory / "evil.distcp").write_bytes(evil)
    metadata = read_dcp_metadata(directory)
    key = "model.model.norm.weight"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data = {i: s for i, s in metadata.storage_data.items() if i.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(evil))
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    model, optimizer = trained_model(seed=1)
    with pytest.raises(MiniCPMError) as error:
        load_dcp(dcp_state(model, optimizer)[0], directory, no_dist=True)
    assert_one_line(error, repr(key), "only tensors")
    assert not marker.exists()


def test_the_reader_refuses_bytes_reads_even_without_its_metadata_check(shards):
    reader = SafeFileSystemReader(shards[0])
    index = MetadataIndex("model.model.norm.weight")
    item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
    with pytest.raises(MiniCPMError) as error:
        reader.read_data(LoadPlan([item]), planner=None)
    assert_one_line(error, "model.model.norm.weight", "only tensors")


def test_a_shard_file_outside_the_directory_is_refused(shards, tmp_path):
    directory = copy_shards(shards[0], tmp_path)
    metadata = read_dcp_metadata(directory)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = dataclasses.replace(info, relative_path="../elsewhere.distcp")
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(MiniCPMError) as error:
        read_dcp_metadata(directory)
    assert_one_line(error, str(directory / ".metadata"), "../elsewhere.distcp", "outside")


@pytest.mark.parametrize("content, expected", [
    (b"", "not DCP checkpoint metadata"),
    (b"\x80\x05garbage", "not DCP checkpoint metadata"),
    (pickle.dumps({"state_dict_metadata": {}}), "holds a dict"),
])
def test_a_malformed_metadata_is_one_line(shards, tmp_path, content, expected):
    directory = copy_shards(shards[0], tmp_path)
    (directory / ".metadata").write_bytes(content)
    with pytest.raises(MiniCPMError) as error:
        read_dcp_metadata(directory)
    assert_one_line(error, str(directory / ".metadata"), expected)


def test_missing_metadata_and_a_truncated_shard_are_one_line(shards, tmp_path):
    with pytest.raises(MiniCPMError) as error:
        read_dcp_metadata(tmp_path)
    assert_one_line(error, str(tmp_path / ".metadata"), "no such file")
    directory = copy_shards(shards[0], tmp_path)
    shard = next(directory.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    model, optimizer = trained_model(seed=1)
    with pytest.raises(MiniCPMError) as error:
        load_dcp(dcp_state(model, optimizer)[0], directory, no_dist=True)
    assert_one_line(error, str(directory), "cannot load the checkpoint shards")
