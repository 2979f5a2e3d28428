"""Tokenizers: train a byte-level BPE, load tokenizer.json or a SentencePiece model, fingerprint a tokenizer.

Our tokenizers are byte-level BPE (HF `tokenizers`): every byte sequence is encodable, so no text is ever
<unk>. Text is split before BPE with the Qwen2 pattern: digits one at a time, letters with at most one leading
non-letter, and runs of whitespace kept whole so that indented code survives (llama.cpp knows this pattern as
``tokenizer.ggml.pre = "qwen2"``, which a GGUF export needs). The special tokens come first, with the official
MiniCPM ids for the first three (paper App. C; llama.cpp logs: unk 0, bos 1, eos 2), then a pad token, the ChatML
tokens for SFT, and reserved tokens for later use.

Documents in token shards are encoded with ``encode_special_tokens = True``: the text ``</s>`` inside a document
is text, never the end-of-sequence id.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from minicpm.data.sources import SourceOptions, iter_corpus
from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object, write_atomic

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
NUM_RESERVED = 10
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IM_START, IM_END,
                                   *(f"<reserved_{i}>" for i in range(NUM_RESERVED)))
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(6)

# The Qwen2 pre-tokenizer pattern (see the module docstring for why this one).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_level_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_level_tokenizer() -> Tokenizer:
    """A BPE with no merges: the special tokens, then the 256 bytes in byte order (byte b is id
    len(SPECIAL_TOKENS) + b). Used by `minicpm init` for a fresh model: any text encodes, one token a byte."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + b for b, symbol in enumerate(_byte_symbols())})
    tok = _byte_level_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _byte_symbols() -> list[str]:
    """The character standing for each byte in a byte-level vocabulary (GPT-2's table, which the ByteLevel
    pre-tokenizer uses): printable Latin-1 bytes stand for themselves, the rest move to U+0100 and up in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, moved = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


def train_tokenizer(sources: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                    max_bytes: int | None = None, options: SourceOptions | None = None,
                    progress: bool = False) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on source specs; return tokenizer.json.

    `sources` are source specs (see `minicpm.data.sources`). `max_bytes` stops reading after that many UTF-8
    bytes (a prefix of the corpus, so the result stays deterministic). Writes, each atomically, tokenizer.json,
    tokenizer_config.json and special_tokens_map.json into `out_dir`, so that `tokenizers.Tokenizer.from_file`
    and transformers' `PreTrainedTokenizerFast.from_pretrained` both load it.
    """
    sources = list(sources)
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise MiniCPMError(f"--vocab-size {vocab_size}: must be at least {minimum} "
                           f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    seen = {"documents": 0, "bytes": 0}

    def texts() -> Iterator[str]:
        for _, doc in iter_corpus(sources, options):
            if not doc.text:
                continue
            if max_bytes is not None and seen["bytes"] >= max_bytes:
                return
            seen["documents"] += 1
            seen["bytes"] += len(doc.text.encode("utf-8"))
            yield doc.text

    tok = _byte_level_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    if seen["documents"] == 0:
        raise MiniCPMError(f"{' '.join(sources)}: no text to train a tokenizer on (empty corpus)")
    return save_tokenizer(tok, out_dir)


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json (+ the transformers config files) into `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
        # shards hold documents as tokens + </s>, with no <s> (see minicpm.data.shards)
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                          "additional_special_tokens")}
    path = out_dir / "tokenizer.json"
    write_atomic(path, tok.to_str(pretty=True))
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_atomic(out_dir / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, a directory holding tokenizer.json (or tokenizer.model), or a SentencePiece .model."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        else:
            raise MiniCPMError(f"{path}: the directory holds neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such tokenizer (give a tokenizer.json, a directory holding one, "
                           "or a SentencePiece .model)")
    if path.suffix == ".model":
        return _from_sentencepiece(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise MiniCPMError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None


def tokenizer_hash(path_or_tok: str | Path | Tokenizer) -> str:
    """A fingerprint of what a tokenizer does (vocab, merges, specials, normalizer, pre-tokenizer, decoder).

    Padding and truncation settings are left out, and so is the file's formatting: the same tokenizer saved
    pretty or compact hashes the same.
    """
    tok = path_or_tok if isinstance(path_or_tok, Tokenizer) else load_tokenizer(path_or_tok)
    spec = json.loads(tok.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def vocab_size(tok: Tokenizer) -> int:
    """Ids run 0..vocab_size-1, added tokens included (the largest id + 1, should the ids have gaps)."""
    return max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab(with_added_tokens=True).values()) + 1)


def eos_id(tok: Tokenizer) -> int:
    """The id that ends a document: </s> (our tokenizers, official MiniCPM), else <|endoftext|> or <|im_end|>."""
    for name in (EOS, "<|endoftext|>", IM_END):
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    raise MiniCPMError(f"the tokenizer has no end-of-document token ({EOS}, <|endoftext|> or {IM_END})")


# ------------------------------------------------------------------------------------------ SentencePiece

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_UNIGRAM, _SP_BPE = 1, 2


def sentencepiece_special_flags(path: Path) -> tuple[bool, bool]:
    """(add_bos_token, add_eos_token) for a SentencePiece model, from the tokenizer_config.json beside it; without
    one, LlamaTokenizer's defaults (BOS yes, EOS no), which the official MiniCPM tokenizer keeps."""
    config_file = path.parent / "tokenizer_config.json"
    config = read_json_object(config_file) if config_file.is_file() else {}
    return bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))


def _from_sentencepiece(path: Path) -> Tokenizer:
    """Rebuild a SentencePiece model (the official MiniCPM tokenizer is a SentencePiece BPE) as a `tokenizers` one
    that encodes as sentencepiece does, and starts a text with <s> where tokenizer_config.json says add_bos_token."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError:
        raise MiniCPMError(f"{path}: reading a SentencePiece model needs sentencepiece and protobuf "
                           "(pip install 'minicpm[hf]' protobuf)") from None
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or an OSError
        raise MiniCPMError(f"{path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise MiniCPMError(f"{path}: not a SentencePiece model (no pieces)")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    add_bos, add_eos = sentencepiece_special_flags(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == _SP_UNKNOWN), spec.unk_id)

    if spec.model_type == _SP_BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(pieces), unk_token=pieces[unk_id][0],
                                   fuse_unk=True, byte_fallback=spec.byte_fallback))
    elif spec.model_type == _SP_UNIGRAM:
        tok = Tokenizer(models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=unk_id,
                                       byte_fallback=spec.byte_fallback))
    else:
        raise MiniCPMError(f"{path}: SentencePiece model type {spec.model_type} is not supported (BPE or unigram)")

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "▁"))
    user_pieces = [piece for piece, _, kind in pieces if kind == _SP_USER_DEFINED]
    if norm.add_dummy_prefix:
        # one "▁" before a non-empty text; not before a user-defined piece's own text, which tokenizers also
        # normalises to find it in the normalised text
        alone = "|".join(re.escape(piece) for piece in user_pieces)
        steps.append(normalizers.Replace(Regex(r"\A(?=[\s\S])" + (rf"(?!(?:{alone})\z)" if alone else "")), "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    special = [AddedToken(piece, special=True, normalized=False)
               for piece, _, kind in pieces if kind in (_SP_CONTROL, _SP_UNKNOWN)]
    # SentencePiece normalises the whole text (one dummy "▁" before it, spaces to "▁"), then matches user-defined
    # pieces ("<AI>", "<|im_start|>") whole: tokens matched in the normalised text (normalized=True) do the same,
    # where tokens cut from the raw text would give each stretch between them its own dummy prefix
    user = [AddedToken(piece, special=False, normalized=True) for piece, _, kind in pieces if kind == _SP_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    # SentencePiece reads "<s>" or "</s>" inside a text as text, never as a control id; only user-defined pieces
    # are matched whole
    tok.encode_special_tokens = True
    bos = pieces[spec.bos_id][0] if 0 <= spec.bos_id < len(pieces) else None
    eos = pieces[spec.eos_id][0] if 0 <= spec.eos_id < len(pieces) else None
    ends = [(bos, spec.bos_id)] if add_bos and bos else []
    tail = [(eos, spec.eos_id)] if add_eos and eos else []
    if ends or tail:
        # as the official LlamaTokenizer: encode(text) (add_special_tokens) = [<s>] + pieces (+ [</s>])
        single = " ".join([*(t for t, _ in ends), "$A", *(t for t, _ in tail)])
        pair = " ".join([single, *(t for t, _ in ends), "$B:1", *(t for t, _ in tail)])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends + tail)
    return tok


def _sentencepiece_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, ordered
    by the rank of the merged piece (SentencePiece stores BPE pieces in merge order)."""
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind in (_SP_NORMAL, _SP_USER_DEFINED)}
    found = []
    for merged, rank in ids.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                found.append((rank, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]
