"""A checkpoint's full weights, whatever its layout: one of ours (model.safetensors, checked against its manifest),
FSDP2 shards written by several processes (dcp/, gathered in one process without a process group), or an official
HF model directory. What an export, an upcycling and a weights-only start read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from minicpm.checkpoints.safe_dcp import load_dcp, read_dcp_metadata
from minicpm.checkpoints.verify import verify_checkpoint
from minicpm.errors import MiniCPMError
from minicpm.interop.hf import checkpoint_config, read_checkpoint
from minicpm.model.config import ModelConfig
from minicpm.model.moe import per_expert_state, stacked_state
from minicpm.model.transformer import MiniCPM
from minicpm.rundir import MODEL_CONFIG_FILE, SHARDS_DIR, STATE_FILE, is_sharded


def consolidate(checkpoint: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and full state dict (official key names) of a checkpoint of either format, read in one process
    without building a model: what `minicpm export` writes out in the official layout."""
    checkpoint = Path(checkpoint)
    if (checkpoint / STATE_FILE).is_file():  # one of our training checkpoints: its files must match its manifest
        verify_checkpoint(checkpoint)
    if not is_sharded(checkpoint):
        return read_checkpoint(checkpoint)
    config = ModelConfig.load(checkpoint / MODEL_CONFIG_FILE)
    shards = checkpoint / SHARDS_DIR
    stored = read_dcp_metadata(shards).state_dict_metadata  # allow-list unpickler: a crafted file runs nothing
    with torch.device("meta"):
        expected = MiniCPM(config).state_dict()
    sizes = {key.removeprefix("model."): meta for key, meta in stored.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    for name, tensor in expected.items():  # checked before anything is allocated
        if name not in sizes:
            raise MiniCPMError(f"{shards}: no shards of {name}")
        if tuple(sizes[name].size) != tuple(tensor.shape):
            raise MiniCPMError(f"{shards}: {name} has shape {tuple(sizes[name].size)}, config.json implies "
                               f"{tuple(tensor.shape)}")
    state = {name: torch.empty(sizes[name].size, dtype=sizes[name].properties.dtype) for name in expected}
    load_dcp({"model": state}, shards, no_dist=True)  # the allow-list reader: nothing in the shards is unpickled
    return config, per_expert_state({name: state[name] for name in expected})  # the shards hold the model's stacks


def source_model_config(source: str | Path) -> ModelConfig:
    """The architecture of a weights directory of any layout (ours, sharded, official HF)."""
    source = Path(source)
    return ModelConfig.load(source / MODEL_CONFIG_FILE) if is_sharded(source) else checkpoint_config(source)


def consolidated_model(checkpoint: str | Path) -> MiniCPM:
    """A plain MiniCPM holding a checkpoint's full weights (either format)."""
    config, state = consolidate(checkpoint)
    with torch.device("meta"):
        model = MiniCPM(config)
    model.load_state_dict(stacked_state(state), assign=True)
    return model
