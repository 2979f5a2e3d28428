"""What an official MiniCPM directory holds besides its weights, kept through import and export: the tokenizer
files (the chat template lives in tokenizer_config.json, or in chat_template.jinja for transformers 5), the remote
code (configuration_minicpm.py, modeling_minicpm.py) with the `auto_map` of config.json that points at it, so that
the output still loads with `trust_remote_code=True`; and the RoPE scalings the official code accepts.

The official MiniCPMConfig validates `rope_scaling` as Llama's config did in transformers 4.36: an object of exactly
two fields, `type` (linear or dynamic) and a float `factor` > 1; anything else is a ValueError at load time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.model.config import ModelConfig, rope_scaling_type
from minicpm.model.rope import ntk_theta

OFFICIAL_FILES = ("configuration_minicpm.py", "modeling_minicpm.py", "generation_config.json")
"""The official modeling files (and generation defaults), carried when they sit in the source directory."""
CARRIED_CONFIG_FIELDS = ("auto_map",)
"""config.json fields of the source that our ModelConfig does not model but a loader needs."""
OFFICIAL_ROPE_TYPES = ("linear", "dynamic")


def official_files(root: Path) -> dict[str, Path]:
    """The official modeling files (and generation_config.json) present in a checkpoint directory."""
    return {name: root / name for name in OFFICIAL_FILES if (root / name).is_file()}


def carried_config_fields(raw: dict, root: Path) -> dict:
    """The source config.json's auto_map, kept when the code it names comes along (a file in the directory) or
    lives in another repository ("owner/repo--module.Class"); dropped when it would point at files we do not have."""
    auto_map = raw.get("auto_map")
    if not isinstance(auto_map, dict) or raw.get("model_type", "minicpm") != "minicpm":
        return {}
    for target in auto_map.values():
        for ref in ([target] if isinstance(target, str) else target or []):
            if isinstance(ref, str) and "--" not in ref and not (root / f"{ref.split('.')[0]}.py").is_file():
                return {}
    return {"auto_map": auto_map}


def official_rope(config: ModelConfig) -> ModelConfig:
    """The config with a RoPE the official MiniCPM code computes the same way: linear or dynamic as
    {"type", "factor"}; static NTK folded into rope_theta (it is only a base change); anything else is refused
    in one line."""
    kind = rope_scaling_type(config.rope_scaling)
    if kind is None:
        return dataclasses.replace(config, rope_scaling=None)
    scaling = config.rope_scaling
    if kind == "ntk":
        return dataclasses.replace(config, rope_theta=ntk_theta(config.rope_theta, scaling["factor"], config.head_dim),
                                   rope_scaling=None)
    if kind not in OFFICIAL_ROPE_TYPES:
        raise MiniCPMError(f"export --to minicpm: rope_scaling type {kind!r} is not one the official MiniCPM config "
                           f"accepts ({', '.join(OFFICIAL_ROPE_TYPES)}); export --to llama or --to gguf writes it")
    factor = float(scaling["factor"])
    extra = sorted(set(scaling) - {"type", "rope_type", "factor", "original_max_position_embeddings"})
    original = scaling.get("original_max_position_embeddings")
    if extra or original not in (None, config.max_position_embeddings):
        what = f"field {extra[0]!r}" if extra else f"original_max_position_embeddings {original}"
        raise MiniCPMError(f"export --to minicpm: rope_scaling {what} has no place in the official MiniCPM config "
                           f"(only type and factor); export --to llama writes it")
    if factor == 1.0 and kind == "linear":
        return dataclasses.replace(config, rope_scaling=None)  # linear by 1 is plain RoPE
    if factor <= 1.0:
        raise MiniCPMError(f"export --to minicpm: rope_scaling factor {factor} must be > 1 for the official MiniCPM "
                           f"config; export --to llama writes it")
    return dataclasses.replace(config, rope_scaling={"type": kind, "factor": factor})
