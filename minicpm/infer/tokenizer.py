"""Tokenizers for generation: the byte-level tokenizer a fresh `minicpm init` writes, and loading the tokenizer that
sits beside a checkpoint (through minicpm.data.tokenizer when that module is present)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minicpm.errors import MiniCPMError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: the official unk/bos/eos ids
END_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>")


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte in a byte-level BPE vocabulary (the GPT-2 convention,
    which HF's ByteLevel pre-tokenizer and decoder use): printable Latin-1 bytes stand for themselves, the others
    are moved to 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, moved = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + moved)
            moved += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer() -> Tokenizer:
    """A BPE without merges over the 256 bytes (ids 3..258) plus <unk>, <s>, </s> (ids 0..2): any text encodes,
    so even a freshly initialised model can generate."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + b for b, symbol in enumerate(_byte_symbols())})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


@dataclass
class TextCodec:
    """What generation needs of a tokenizer: text → ids, ids → text, its size and its end-of-text id."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    eos_id: int | None


def _codec_from_hf(tokenizer: Tokenizer) -> TextCodec:
    eos = next((tokenizer.token_to_id(t) for t in END_TOKENS if tokenizer.token_to_id(t) is not None), None)
    return TextCodec(encode=lambda text: tokenizer.encode(text).ids,
                     decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                     vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_id=eos)


def _codec_from_data_module(path: Path) -> TextCodec | None:
    try:
        from minicpm.data.tokenizer import load_tokenizer  # the data issue's loader (tokenizer.json or SentencePiece)
    except ImportError:
        return None
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, Tokenizer):
        return _codec_from_hf(tokenizer)
    encode = getattr(tokenizer, "encode", None)
    decode = getattr(tokenizer, "decode", None)
    if encode is None or decode is None:
        return None
    size = getattr(tokenizer, "vocab_size", None)
    size = size() if callable(size) else size
    eos = getattr(tokenizer, "eos_id", None)
    eos = eos() if callable(eos) else eos

    def encode_ids(text: str) -> list[int]:
        out = encode(text)
        return list(getattr(out, "ids", out))

    return TextCodec(encode=encode_ids, decode=lambda ids: decode(list(ids)), vocab_size=int(size or 0),
                     eos_id=eos)


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
    """Load a tokenizer file as a TextCodec."""
    path = find_tokenizer(None, path)
    codec = _codec_from_data_module(path)
    if codec is not None:
        return codec
    if path.suffix != ".json":
        raise MiniCPMError(f"{path}: only tokenizer.json files can be read here (SentencePiece needs minicpm.data)")
    try:
        return _codec_from_hf(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise MiniCPMError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
