"""Token shards: the on-disk form of a prepared dataset, its writer, reader and checker.

Layout of a prepared dataset directory DIR (written by `minicpm prepare`, see `minicpm.data.prepare`)::

    DIR/meta.json            what is in it (below)
    DIR/tokenizer.json       a copy of the tokenizer that made it (so `minicpm data inspect` can decode)
    DIR/train/00000.bin      token ids, flat, little-endian `dtype` (uint16 when every id fits, else uint32)
    DIR/train/00000.idx      document offsets into the .bin: little-endian int64, documents + 1 entries, from 0
    DIR/train/00001.bin ...  further shards (a document never spans two shards)
    DIR/val/00000.bin ...    the held-out split, same form (absent when --val-fraction is 0)
    DIR/train/00000.mask     chat data only (meta.json "loss_mask": true): one byte per token of the .bin, 1 where
                             the token is a training target (an assistant's answer), 0 elsewhere

Each document is its tokens followed by the end-of-document id (</s>, id 2 for our tokenizers); no <s> is
added. meta.json::

    {"format": "minicpm-shards", "version": 1, "dtype": "uint16",
     "tokenizer": {"hash": "...", "vocab_size": 8192, "eos_id": 2, "source": "tok/tokenizer.json"},
     "document_format": "tokens + eos",
     "sources": [{"spec": "stdlib", "documents": 1786, "bytes": 31457280}],
     "val_fraction": 0.01, "skipped_empty_documents": 0,
     "splits": {"train": {"documents": D, "tokens": T, "bytes": B,
                          "shards": [{"name": "00000", "documents": D, "tokens": T,
                                      "sha256_bin": "...", "sha256_idx": "..."}]},
                "val": {...}}}

Chat data (`minicpm prepare --format chat`, see `minicpm.data.chat`) adds `"loss_mask": true`, `"chat": {the
template}`, `"skipped_too_long"` and a `sha256_mask` per shard; readers that do not know the keys read its tokens
as plain text.

`bytes` counts the UTF-8 bytes of the documents' text, so bits per byte = nats per token / ln 2 / (bytes/tokens)
(the paper reports loss per byte, Sec. 6.1, following GPT-4). meta.json holds no times or paths of the build, so
the same input gives byte-identical output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object

FORMAT, VERSION = "minicpm-shards", 1
OFFSET_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")
DEFAULT_SHARD_TOKENS = 1 << 28   # 512 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0..vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ------------------------------------------------------------------------------------------------ writing

@dataclass
class ShardInfo:
    name: str
    documents: int
    tokens: int
    sha256_bin: str
    sha256_idx: str
    sha256_mask: str | None = None


class ShardWriter:
    """Appends documents to numbered shards in one split directory; a new shard starts past `shard_tokens`."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS, *,
                 loss_mask: bool = False):
        self.directory, self.dtype, self.shard_tokens = Path(directory), np.dtype(dtype), shard_tokens
        self.loss_mask = loss_mask
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._mask_file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._mask_hash = hashlib.sha256()
        self._offsets: list[int] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents given as their concatenated tokens and their lengths (EOS included); a writer made
        with loss_mask=True takes each token's loss mask too."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        if int(lengths.sum()) != len(data):
            raise ValueError(f"{len(data)} tokens do not match document lengths summing to {int(lengths.sum())}")
        if self.loss_mask != (mask is not None) or (mask is not None and len(mask) != len(data)):
            raise ValueError("a loss-mask writer takes one mask value per token; a plain writer takes none")
        flags = None if mask is None else np.ascontiguousarray(mask, dtype=MASK_DTYPE)
        if len(lengths) == 0:
            return
        start = run_start = 0
        for length in lengths.tolist():
            if self._file is not None and self._offsets[-1] > 0 and self._offsets[-1] + length > self.shard_tokens:
                self._write(data[run_start:start], None if flags is None else flags[run_start:start])
                run_start = start
                self._close_shard()
            if self._file is None:
                self._open_shard()
            self._offsets.append(self._offsets[-1] + length)
            start += length
        self._write(data[run_start:start], None if flags is None else flags[run_start:start])

    def _write(self, chunk: np.ndarray, flags: np.ndarray | None) -> None:
        raw = chunk.tobytes()
        self._file.write(raw)
        self._hash.update(raw)
        if flags is not None:
            raw = flags.tobytes()
            self._mask_file.write(raw)
            self._mask_hash.update(raw)

    def _open_shard(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{len(self.shards):05d}"
        self._file = open(self.directory / f"{name}.bin", "wb")
        self._hash = hashlib.sha256()
        if self.loss_mask:
            self._mask_file = open(self.directory / f"{name}.mask", "wb")
            self._mask_hash = hashlib.sha256()
        self._offsets = [0]

    def _close_shard(self) -> None:
        self._file.close()
        if self._mask_file is not None:
            self._mask_file.close()
            self._mask_file = None
        name = f"{len(self.shards):05d}"
        idx = np.asarray(self._offsets, dtype=OFFSET_DTYPE).tobytes()
        (self.directory / f"{name}.idx").write_bytes(idx)
        self.shards.append(ShardInfo(name, len(self._offsets) - 1, self._offsets[-1],
                                     self._hash.hexdigest(), hashlib.sha256(idx).hexdigest(),
                                     self._mask_hash.hexdigest() if self.loss_mask else None))
        self._file = None

    def close(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Close the open files without finishing their shard (the caller removes the directory)."""
        for f in (self._file, self._mask_file):
            if f is not None:
                f.close()
        self._file = self._mask_file = None


def shard_entry(info: ShardInfo) -> dict:
    """The shard's record in meta.json (sha256_mask only for chat data)."""
    return {k: v for k, v in dataclasses.asdict(info).items() if not (k == "sha256_mask" and v is None)}


# ------------------------------------------------------------------------------------------------ reading

def read_meta(path: str | Path) -> dict:
    """meta.json of a prepared dataset, checked for format and version."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise MiniCPMError(f"{path}: no such prepared dataset (make one with `minicpm prepare`)")
    if not meta_path.is_file():
        raise MiniCPMError(f"{meta_path}: missing, so {path} is not a prepared dataset (or its build did not finish)")
    meta = read_json_object(meta_path)
    if meta.get("format") != FORMAT:
        raise MiniCPMError(f"{meta_path}: not a minicpm shard set (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise MiniCPMError(f"{meta_path}: version {meta.get('version')!r}, this minicpm reads version {VERSION}")
    for key in ("dtype", "tokenizer", "splits"):
        if key not in meta:
            raise MiniCPMError(f"{meta_path}: no '{key}' key")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise MiniCPMError(f"{meta_path}: dtype {meta['dtype']!r}, expected uint16 or uint32")
    _check_meta_fields(meta, meta_path)
    return meta


_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_NAME = re.compile(r"^[0-9]{5,}$")  # ShardWriter numbers its shards 00000, 00001, ...
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _check_meta_fields(meta: dict, meta_path: Path) -> None:
    """Types and ranges of every field the readers use; the first wrong one is a MiniCPMError naming it."""
    def fail(field: str, what: str) -> None:
        raise MiniCPMError(f"{meta_path}: {field} {what}")

    def count(value: object, field: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail(field, f"must be an integer >= 0, got {value!r}")

    def mapping(value: object, field: str) -> None:
        if not isinstance(value, dict):
            fail(field, f"must be an object, got {type(value).__name__}")

    tok = meta["tokenizer"]
    mapping(tok, "tokenizer")
    if not isinstance(tok.get("hash"), str):
        fail("tokenizer.hash", f"must be a string, got {tok.get('hash')!r}")
    vocab, eos = tok.get("vocab_size"), tok.get("eos_id")
    count(vocab, "tokenizer.vocab_size")
    count(eos, "tokenizer.eos_id")
    if eos >= vocab:
        fail("tokenizer.eos_id", f"{eos} is outside the vocabulary of {vocab}")
    mapping(meta["splits"], "splits")
    for split, info in meta["splits"].items():
        if not _SPLIT_NAME.match(split):
            fail("splits", f"has a split named {split!r}, not a plain directory name")
        where = f"splits.{split}"
        mapping(info, where)
        for key in ("documents", "tokens", "bytes"):
            count(info.get(key), f"{where}.{key}")
        if not isinstance(info.get("shards"), list):
            fail(f"{where}.shards", f"must be a list, got {type(info.get('shards')).__name__}")
        for i, shard in enumerate(info["shards"]):
            mapping(shard, f"{where}.shards[{i}]")
            if not isinstance(shard.get("name"), str) or not _SHARD_NAME.match(shard["name"]):
                fail(f"{where}.shards[{i}].name", f"must be a shard number such as '00000', got {shard.get('name')!r}")
            for key in ("documents", "tokens"):
                count(shard.get(key), f"{where}.shards[{i}].{key}")
            for key in ("sha256_bin", "sha256_idx") + (("sha256_mask",) if meta.get("loss_mask") else ()):
                if not isinstance(shard.get(key), str) or not _SHA256_HEX.match(shard[key]):
                    fail(f"{where}.shards[{i}].{key}", "must be 64 lowercase hex digits")
    sources = meta.get("sources", [])
    if not isinstance(sources, list):
        fail("sources", f"must be a list, got {type(sources).__name__}")
    for i, source in enumerate(sources):
        mapping(source, f"sources[{i}]")
        if not isinstance(source.get("spec"), str):
            fail(f"sources[{i}].spec", f"must be a string, got {source.get('spec')!r}")
        for key in ("documents", "bytes"):
            count(source.get(key), f"sources[{i}].{key}")
    if "skipped_empty_documents" in meta:
        count(meta["skipped_empty_documents"], "skipped_empty_documents")
    if not isinstance(meta.get("loss_mask", False), bool):
        fail("loss_mask", f"must be true or false, got {meta['loss_mask']!r}")


class TokenDataset:
    """One split of a prepared dataset: memory-mapped tokens across shards, with document offsets.

    Token positions are global over the split (shard after shard); `doc_starts[i]:doc_starts[i+1]` is document i.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.split = split
        self.meta = read_meta(self.path)
        splits = self.meta["splits"]
        if split not in splits:
            raise MiniCPMError(f"{self.path}: no '{split}' split (has: {', '.join(splits) or 'none'})")
        info = splits[split]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")  # shards are little-endian everywhere
        self._tokens: list[np.ndarray] = []
        self.has_loss_mask = bool(self.meta.get("loss_mask", False))
        self._masks: list[np.ndarray] = []
        starts, bases, base = [], [0], 0
        for shard in info["shards"]:
            tokens, offsets = self._open_shard(shard)
            self._tokens.append(tokens)
            if self.has_loss_mask:
                self._masks.append(self._open_mask(shard))
            starts.append(offsets[:-1] + base)
            base += len(tokens)
            bases.append(base)
        starts.append(np.array([base], dtype=np.int64))
        self.doc_starts = np.concatenate(starts).astype(np.int64)
        self.shard_starts = np.array(bases, dtype=np.int64)
        self.num_tokens = base
        self.num_documents = len(self.doc_starts) - 1
        self.num_bytes = int(info["bytes"])
        if self.num_tokens != info["tokens"] or self.num_documents != info["documents"]:
            raise MiniCPMError(f"{self.path / 'meta.json'}: split '{split}' says {info['documents']} documents and "
                               f"{info['tokens']} tokens, the shards hold {self.num_documents} and {self.num_tokens}")

    def _open_shard(self, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        folder = self.path / self.split
        bin_path, idx_path = folder / f"{shard['name']}.bin", folder / f"{shard['name']}.idx"
        for p, expected in ((bin_path, shard["tokens"] * self.dtype.itemsize),
                            (idx_path, (shard["documents"] + 1) * OFFSET_DTYPE.itemsize)):
            if not p.is_file():
                raise MiniCPMError(f"{p}: missing (the dataset is incomplete; rerun `minicpm prepare`)")
            size = p.stat().st_size
            if size != expected:
                raise MiniCPMError(f"{p}: {size} bytes, meta.json implies {expected} (truncated or corrupt; "
                                   "rerun `minicpm prepare`)")
        tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if shard["tokens"] else np.zeros(0, self.dtype)
        offsets = np.fromfile(idx_path, dtype=OFFSET_DTYPE)
        if offsets[0] != 0 or offsets[-1] != shard["tokens"] or np.any(np.diff(offsets) <= 0):
            raise MiniCPMError(f"{idx_path}: document offsets are not increasing from 0 to {shard['tokens']} (corrupt)")
        return tokens, offsets

    def _open_mask(self, shard: dict) -> np.ndarray:
        path = self.path / self.split / f"{shard['name']}.mask"
        if not path.is_file():
            raise MiniCPMError(f"{path}: missing (the dataset is incomplete; rerun `minicpm prepare`)")
        if path.stat().st_size != shard["tokens"]:
            raise MiniCPMError(f"{path}: {path.stat().st_size} bytes, meta.json implies {shard['tokens']} (truncated "
                               f"or corrupt; rerun `minicpm prepare`)")
        return np.memmap(path, dtype=MASK_DTYPE, mode="r") if shard["tokens"] else np.zeros(0, MASK_DTYPE)

    @property
    def tokenizer_hash(self) -> str:
        return self.meta["tokenizer"]["hash"]

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """Whether each token [start, stop) is a training target: the mask channel of chat data, all True for
        plain text."""
        if not self.has_loss_mask:
            return np.ones(stop - start, dtype=bool)
        return self._slice(self._masks, start, stop).astype(bool)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Document i's tokens, its end-of-document id included."""
        return self.tokens(int(self.doc_starts[i]), int(self.doc_starts[i + 1]))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, copied out of the shards they lie in."""
        return self._slice(self._tokens, start, stop)

    def _slice(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens})")
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        parts = []
        while start < stop:
            base, end = int(self.shard_starts[first]), int(self.shard_starts[first + 1])
            take = min(stop, end)
            parts.append(arrays[first][start - base:take - base])
            start = take
            first += 1
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def document_lengths(self) -> np.ndarray:
        return np.diff(self.doc_starts)

    def check_token_ids(self, vocab_size: int, *, sample_tokens: int = 1 << 20, windows: int = 16) -> None:
        """Before training: the ids of a sample (`windows` contiguous windows per shard, sample_tokens in all,
        spread from start to end) lie below the model's vocabulary; one MiniCPMError naming the shard otherwise.
        `minicpm data verify` checks every token."""
        recorded = self.meta["tokenizer"]["vocab_size"]
        if recorded > vocab_size:
            raise MiniCPMError(f"{self.path / 'meta.json'}: tokenizer.vocab_size {recorded} exceeds the model's "
                               f"vocab_size {vocab_size}")
        per_window = max(1, sample_tokens // max(1, windows * len(self._tokens)))
        for shard, tokens in zip(self.meta["splits"][self.split]["shards"], self._tokens):
            n = len(tokens)
            for start in np.linspace(0, max(0, n - per_window), num=min(windows, max(1, n)), dtype=np.int64):
                window = np.asarray(tokens[int(start):int(start) + per_window])
                if window.size and int(window.max()) >= vocab_size:
                    where = int(start) + int(window.argmax())
                    raise MiniCPMError(f"{self.path / self.split / shard['name']}.bin: token {where} is id "
                                       f"{int(window.max())}, not below the vocabulary size {vocab_size} "
                                       f"(corrupt; `minicpm data verify {self.path}` checks every token)")


def open_dataset(path: str | Path, split: str = "train") -> TokenDataset:
    """Open one split of a prepared dataset; a missing or truncated file is a MiniCPMError naming it."""
    return TokenDataset(path, split)


def verify(path: str | Path) -> dict[str, dict[str, int]]:
    """Check every shard against meta.json: sizes, checksums, offsets, ids below the vocabulary size and an
    end-of-document id closing each document. Returns the per-split counts; raises MiniCPMError on a fault."""
    path = Path(path)
    meta = read_meta(path)
    vocab, eos = meta["tokenizer"]["vocab_size"], meta["tokenizer"]["eos_id"]
    counts = {}
    for split, info in meta["splits"].items():
        ds = open_dataset(path, split)
        for shard, tokens in zip(info["shards"], ds._tokens):
            checked = ((".bin", "sha256_bin"), (".idx", "sha256_idx")) + \
                (((".mask", "sha256_mask"),) if ds.has_loss_mask else ())
            for suffix, key in checked:
                file = path / split / f"{shard['name']}{suffix}"
                if _sha256_file(file) != shard[key]:
                    raise MiniCPMError(f"{file}: checksum differs from meta.json (corrupt; rerun `minicpm prepare`)")
            if len(tokens) and int(tokens.max()) >= vocab:
                raise MiniCPMError(f"{path / split / shard['name']}.bin: token id {int(tokens.max())} is outside "
                                   f"the vocabulary of {vocab}")
        if ds.num_documents:
            ends = ds.doc_starts[1:] - 1
            last = _gather(ds, ends)
            if np.any(last != eos):
                bad = int(np.flatnonzero(last != eos)[0])
                raise MiniCPMError(f"{path / split}: document {bad} does not end with the end-of-document id {eos}")
        counts[split] = {"documents": ds.num_documents, "tokens": ds.num_tokens, "bytes": ds.num_bytes}
    return counts


def _gather(ds: TokenDataset, positions: np.ndarray) -> np.ndarray:
    """ds's tokens at sorted global `positions`, shard by shard."""
    shard_of = np.searchsorted(ds.shard_starts, positions, side="right") - 1
    out = np.empty(len(positions), dtype=np.int64)
    for s, tokens in enumerate(ds._tokens):
        mask = shard_of == s
        out[mask] = tokens[positions[mask] - ds.shard_starts[s]]
    return out


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ inspecting

def describe(path: str | Path, *, samples: int = 3, sample_chars: int = 240, seed: int = 0) -> str:
    """A plain-text report: counts per split, sources, the document-length histogram and a few decoded samples."""
    from minicpm.data.tokenizer import load_tokenizer

    path = Path(path)
    meta = read_meta(path)
    tok = meta["tokenizer"]
    lines = [f"dataset    {path}",
             f"tokenizer  {tok['hash']} (vocab {tok['vocab_size']}, eos {tok['eos_id']}, from {tok.get('source')})",
             f"dtype      {meta['dtype']}",
             "",
             f"{'split':<6} {'documents':>10} {'tokens':>14} {'MB':>10} {'bytes/token':>12} {'shards':>7}"]
    for split, info in meta["splits"].items():
        lines.append(f"{split:<6} {info['documents']:>10,} {info['tokens']:>14,} {info['bytes'] / 1e6:>10.2f} "
                     f"{info['bytes'] / max(info['tokens'], 1):>12.3f} {len(info['shards']):>7}")
    lines += ["", "sources:"]
    lines += [f"  {s['spec']}: {s['documents']:,} documents, {s['bytes'] / 1e6:.2f} MB"
              for s in meta.get("sources", [])]
    if meta.get("skipped_empty_documents"):
        lines.append(f"  ({meta['skipped_empty_documents']:,} empty documents skipped)")

    ds = open_dataset(path, "train")
    lengths = ds.document_lengths()
    if not len(lengths):
        return "\n".join([*lines, "", "the train split holds no documents"])
    lines += ["", f"document length in tokens (train; eos included): min {lengths.min():,}, "
                  f"median {int(np.median(lengths)):,}, mean {lengths.mean():,.1f}, max {lengths.max():,}"]
    lines += _histogram(lengths)

    decoder = load_tokenizer(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    if samples and decoder is not None:
        picks = np.sort(np.random.default_rng(seed).choice(len(ds), size=min(samples, len(ds)), replace=False))
        lines += ["", f"samples (train, first {sample_chars} characters):"]
        for i in picks.tolist():
            doc = ds.document(i)
            text = decoder.decode(doc[:-1].tolist(), skip_special_tokens=False)
            clipped = text[:sample_chars] + (" …" if len(text) > sample_chars else "")
            lines.append(f"  [{i}] {len(doc):,} tokens: {clipped!r}")
    return "\n".join(lines)


def _histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Counts of document lengths in power-of-two bins [2^k, 2^(k+1)), as text bars."""
    counts = np.bincount(np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64))
    first = int(np.flatnonzero(counts)[0])
    peak = int(counts.max())
    rows = []
    for k in range(first, len(counts)):
        count = int(counts[k])
        bar = "#" * (max(1, round(count / peak * width)) if count else 0)
        rows.append(f"  {1 << k:>11,} – {(2 << k) - 1:<11,} {count:>9,} {bar}")
    return rows
