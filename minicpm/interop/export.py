"""`minicpm export`: a checkpoint of any layout (ours, DCP shards, official HF) to another format."""

from __future__ import annotations

import os
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.files import check_output, output_directory
from minicpm.interop.formats import EXPORT_FORMATS
from minicpm.interop.hf import PathLike, import_checkpoint, model_dtype, official_state, parse_size, save_state
from minicpm.interop.official import official_rope
from minicpm.interop.llama import export_llama
from minicpm.interop.mixtral import export_mixtral


def export_checkpoint(checkpoint: PathLike, out: PathLike, *, to: str, dtype: str | None = None,
                      max_shard_size: str | None = None, gguf_arch: str = "minicpm", gguf_type: str = "f16",
                      tokenizer: PathLike | None = None, official: bool = True, overwrite: bool = False) -> Path:
    """Write `checkpoint` (a checkpoint or model directory, or a run directory: its newest checkpoint that verifies)
    to `out` in the format `to` (one of EXPORT_FORMATS); max_shard_size like '2GB'.
    For gguf: gguf_arch (minicpm | llama), gguf_type (f32 | f16 | bf16 | q8_0) and the tokenizer to embed
    (default: the one beside the checkpoint); `out` is the .gguf file, or a directory (an existing one, or a name
    ending in /) that gets OUT/model.gguf. official (to minicpm): write only a RoPE scaling the official MiniCPM
    config accepts, or fail in one line saying why; `minicpm import` turns it off (our layout computes every
    scaling). `out` follows files.check_output: new (or an empty directory) unless overwrite, never an input."""
    from minicpm.checkpoints.verify import resolve_verified_weights, warn_on_stderr

    if to not in EXPORT_FORMATS:
        raise MiniCPMError(f"--to {to!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    source = resolve_verified_weights(checkpoint, warn_on_stderr)
    inputs = [checkpoint, source, tokenizer]
    if to == "gguf":
        from minicpm.interop.gguf import export_gguf

        out_file = Path(out)
        if str(out).endswith(("/", os.sep)) or out_file.is_dir():
            out_file = out_file / "model.gguf"
        check_output(out_file, inputs=inputs, overwrite=overwrite, flag="OUT")
        return export_gguf(source, out_file, arch=gguf_arch, dtype=gguf_type, tokenizer=tokenizer)
    shard = parse_size(max_shard_size) if max_shard_size else None
    with output_directory(out, inputs=inputs, overwrite=overwrite, flag="OUT") as tmp:
        _export_directory(source, tmp, to=to, dtype=dtype, shard=shard, official=official)
    return Path(out)


def _export_directory(checkpoint: Path, out: Path, *, to: str, dtype: str | None, shard: int | None,
                      official: bool) -> Path:
    from minicpm.checkpoints.weights import consolidated_model
    from minicpm.rundir import is_sharded

    if is_sharded(checkpoint):  # written by several processes: gather the DCP shards into one model
        model = consolidated_model(checkpoint)
        if to == "llama":
            return export_llama(model, out, dtype, max_shard_bytes=shard)
        if to == "mixtral":
            return export_mixtral(model, out, dtype, max_shard_bytes=shard)
        config = official_rope(model.config) if official else model.config
        return save_state(config, official_state(model), out, dtype=dtype or model_dtype(model),
                          max_shard_bytes=shard)
    if to == "llama":
        return export_llama(checkpoint, out, dtype, max_shard_bytes=shard)
    if to == "mixtral":
        return export_mixtral(checkpoint, out, dtype, max_shard_bytes=shard)
    return import_checkpoint(checkpoint, out, dtype=dtype, max_shard_bytes=shard, official_rope=official)
