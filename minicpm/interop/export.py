"""`minicpm export`: a checkpoint of any layout (ours, DCP shards, official HF) to another format."""

from __future__ import annotations

from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import PathLike, import_checkpoint, parse_size, save_model
from minicpm.interop.llama import export_llama

EXPORT_FORMATS = ("llama", "minicpm")
"""llama: plain LlamaForCausalLM with μP folded in; minicpm: the official MiniCPM layout (another dtype, sharded)."""


def export_checkpoint(checkpoint: PathLike, out: PathLike, *, to: str, dtype: str | None = None,
                      max_shard_size: str | None = None) -> Path:
    """Write `checkpoint` to `out` in the format `to` (one of EXPORT_FORMATS); max_shard_size like '2GB'."""
    from minicpm.rundir import is_sharded
    from minicpm.train.checkpoint import consolidated_model

    if to not in EXPORT_FORMATS:
        raise MiniCPMError(f"--to {to!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    shard = parse_size(max_shard_size) if max_shard_size else None
    if is_sharded(checkpoint):  # written by several processes: gather the DCP shards into one model
        model = consolidated_model(checkpoint)
        if to == "llama":
            return export_llama(model, out, dtype, max_shard_bytes=shard)
        return save_model(model, out, dtype=dtype, max_shard_bytes=shard)
    if to == "llama":
        return export_llama(checkpoint, out, dtype, max_shard_bytes=shard)
    return import_checkpoint(checkpoint, out, dtype=dtype, max_shard_bytes=shard)
