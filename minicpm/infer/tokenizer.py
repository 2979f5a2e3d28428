"""The tokenizer a checkpoint generates with: found beside it (or named), loaded by minicpm.data.tokenizer, and
reduced to what generation needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from minicpm.data.tokenizer import eos_id, load_tokenizer, vocab_size
from minicpm.errors import MiniCPMError


@dataclass
class TextCodec:
    """What generation needs of a tokenizer: text → ids, ids → text, its size and its end-of-text id."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    eos_id: int | None


def codec(tokenizer: Tokenizer) -> TextCodec:
    try:
        end = eos_id(tokenizer)
    except MiniCPMError:
        end = None  # generation then stops only at max_new_tokens
    return TextCodec(encode=lambda text: tokenizer.encode(text).ids,
                     decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                     vocab_size=vocab_size(tokenizer), eos_id=end)


def find_tokenizer(checkpoint: str | Path | None, explicit: str | Path | None = None) -> Path:
    """The tokenizer file: --tokenizer if given (a file, or a directory holding one), else the tokenizer.json
    (or tokenizer.model) beside the checkpoint."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise MiniCPMError(f"{path}: no such tokenizer file")
        if path.is_file():
            return path
        root = path
    else:
        root = Path(checkpoint)
        root = root.parent if root.is_file() else root
    for name in ("tokenizer.json", "tokenizer.model"):
        if (root / name).is_file():
            return root / name
    raise MiniCPMError(f"{root}: no tokenizer.json or tokenizer.model beside the checkpoint; pass --tokenizer")


def load_codec(path: str | Path) -> TextCodec:
    """A tokenizer.json, a SentencePiece .model, or a directory holding one, as a TextCodec."""
    return codec(load_tokenizer(find_tokenizer(None, path)))
