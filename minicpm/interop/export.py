"""`minicpm export`: a checkpoint of any layout (ours, DCP shards, official HF) to another format."""

from __future__ import annotations

from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.interop.formats import EXPORT_FORMATS
from minicpm.interop.hf import PathLike, _model_dtype, import_checkpoint, parse_size, save_state
from minicpm.interop.official import official_rope
from minicpm.interop.llama import export_llama
from minicpm.interop.mixtral import export_mixtral



def export_checkpoint(checkpoint: PathLike, out: PathLike, *, to: str, dtype: str | None = None,
                      max_shard_size: str | None = None, gguf_arch: str = "minicpm", gguf_type: str = "f16",
                      tokenizer: PathLike | None = None, official: bool = True) -> Path:
    """Write `checkpoint` to `out` in the format `to` (one of EXPORT_FORMATS); max_shard_size like '2GB'.
    For gguf: gguf_arch (minicpm | llama), gguf_type (f32 | f16 | bf16 | q8_0) and the tokenizer to embed
    (default: the one beside the checkpoint). official (to minicpm): write only a RoPE scaling the official MiniCPM
    config accepts, or fail in one line saying why; `minicpm import` turns it off (our layout computes every
    scaling)."""
    from minicpm.rundir import is_sharded
    from minicpm.train.checkpoint import consolidated_model

    if to not in EXPORT_FORMATS:
        raise MiniCPMError(f"--to {to!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if to == "gguf":
        from minicpm.interop.gguf import export_gguf

        return export_gguf(checkpoint, out, arch=gguf_arch, dtype=gguf_type, tokenizer=tokenizer)
    shard = parse_size(max_shard_size) if max_shard_size else None
    if is_sharded(checkpoint):  # written by several processes: gather the DCP shards into one model
        model = consolidated_model(checkpoint)
        if to == "llama":
            return export_llama(model, out, dtype, max_shard_bytes=shard)
        if to == "mixtral":
            return export_mixtral(model, out, dtype, max_shard_bytes=shard)
        config = official_rope(model.config) if official else model.config
        return save_state(config, model.state_dict(), out, dtype=dtype or _model_dtype(model), max_shard_bytes=shard)
    if to == "llama":
        return export_llama(checkpoint, out, dtype, max_shard_bytes=shard)
    if to == "mixtral":
        return export_mixtral(checkpoint, out, dtype, max_shard_bytes=shard)
    return import_checkpoint(checkpoint, out, dtype=dtype, max_shard_bytes=shard, official_rope=official)
