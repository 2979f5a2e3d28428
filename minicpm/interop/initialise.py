"""A freshly μP-initialised model written in the official layout (`minicpm init`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from minicpm.errors import MiniCPMError
from minicpm.files import check_output, output_directory
from minicpm.interop.hf import PathLike, parse_dtype, save_model
from minicpm.model.config import ModelConfig


def init_checkpoint(config: ModelConfig, out_dir: PathLike, *, seed: int = 0, dtype: str | torch.dtype | None = None,
                    tokenizer: PathLike | None = None, embedding_in_2d_group: bool = False,
                    progress: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """A freshly μP-initialised model in the official layout, with a tokenizer beside it (the given one, else the
    byte-level tokenizer) so that even a fresh model can generate. progress(message) hears what is slow. `out_dir`
    follows files.check_output: new (or an empty directory) unless overwrite, never the tokenizer's directory."""
    from minicpm.data.tokenizer import byte_level_tokenizer, vocab_size
    from minicpm.infer.tokenizer import find_tokenizer, load_codec
    from minicpm.model.build import build_model

    out_dir = check_output(out_dir, inputs=[tokenizer], overwrite=overwrite, flag="OUT")
    if tokenizer is not None:
        path = find_tokenizer(None, tokenizer)
        size = load_codec(path).vocab_size
        extra: dict = {"tokenizer.model" if path.suffix == ".model" else "tokenizer.json": path}
    else:
        byte_level = byte_level_tokenizer()
        size = vocab_size(byte_level)
        extra = {"tokenizer.json": byte_level.to_str()}
    if size > config.vocab_size:
        raise MiniCPMError(f"tokenizer has {size} tokens but vocab_size is {config.vocab_size}; "
                           f"set vocab_size={size} or more")
    if progress:
        progress(f"initialising {config.total_params():,} parameters (μP, seed {seed})")
    model = build_model(config, dtype=parse_dtype(dtype), seed=seed, embedding_in_2d_group=embedding_in_2d_group)
    if progress:
        progress(f"writing {out_dir}")
    with output_directory(out_dir, inputs=[tokenizer], overwrite=overwrite, flag="OUT") as tmp:
        save_model(model, tmp, extra_files=extra)
    return out_dir
