"""Which model a command means: a preset name or a checkpoint directory, with config fields overridden."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.model.config import PRESETS, ModelConfig, preset


def is_checkpoint_path(name_or_path: str) -> bool:
    """A preset is a bare name; anything that exists or looks like a path is a checkpoint."""
    return name_or_path not in PRESETS and (Path(name_or_path).exists() or "/" in name_or_path)


def model_config_for(name_or_path: str) -> ModelConfig:
    """The ModelConfig of a preset (an unknown name fails listing the presets) or of a checkpoint directory."""
    if not is_checkpoint_path(name_or_path):
        return preset(name_or_path)
    from minicpm.interop.hf import checkpoint_config

    return checkpoint_config(name_or_path)


def with_overrides(config: ModelConfig, overrides: list[str]) -> ModelConfig:
    """The config with KEY=VALUE changes of its fields (values parsed as JSON where they are JSON)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise MiniCPMError(f"override {item!r}: expected KEY=VALUE with KEY a model config field "
                               f"(e.g. vocab_size=4096, num_hidden_layers=4)")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return dataclasses.replace(config, **changes)


def describe_model(name_or_path: str, *, seq_len: int | None = None) -> str:
    """`minicpm info`: the config table, parameter counts and FLOPs of a preset or a checkpoint, and for a checkpoint
    directory what its weight files hold."""
    from minicpm.model.summary import describe

    if seq_len is not None and seq_len < 1:
        raise MiniCPMError(f"--seq-len {seq_len}: must be at least 1")
    is_checkpoint = is_checkpoint_path(name_or_path)
    text = describe(model_config_for(name_or_path), seq_len=seq_len,
                    title=f"{name_or_path} ({'checkpoint' if is_checkpoint else 'preset'})")
    if is_checkpoint and Path(name_or_path).is_dir():
        from minicpm.interop.hf import checkpoint_summary

        s = checkpoint_summary(name_or_path)
        text += (f"\nweights: {s['parameters']:,} parameters in {s['tensors']} tensors, {'/'.join(s['dtypes'])}, "
                 f"{', '.join(s['files'])}")
    return text
