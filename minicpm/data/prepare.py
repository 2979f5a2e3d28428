"""`minicpm prepare`: source specs → a tokenized, sharded dataset (layout in `minicpm.data.shards`).

Documents are read in this process, so a bad file stops the run with its file and line. Batches of documents are
encoded by a pool of workers: threads of this process (HF tokenizers releases the GIL while it encodes, so threads
run on all cores without the start-up and copying costs of processes) or, past `THREADS_AT_MOST` workers, where the
GIL-held part (turning ids into arrays) would start to limit threads, spawned processes. Each worker encodes whole
batches serially (tokenizers' own thread pool off: one worker per core already, and a pool shared between workers
waits at the end of every batch). Results are written in submission order, so the output is the same byte for byte
whatever the number or kind of workers. Everything is built under a hidden temporary name next to the
output and renamed into place at the end: a failed or interrupted run leaves nothing behind.

The held-out split is deterministic and spread evenly through the corpus: with fraction f, non-empty document i
(counting from 0) is held out when floor((i+1)·f + 1 − f) > floor(i·f + 1 − f): document 0, then one document in
every 1/f, 1 + floor((n−1)·f) of n documents in all (at least one whenever f > 0).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import os
import shutil
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from minicpm.data.shards import DEFAULT_SHARD_TOKENS, FORMAT, VERSION, ShardWriter, shard_entry, token_dtype
from minicpm.data.sources import SourceOptions, iter_corpus, source_roots
from minicpm.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash, vocab_size
from minicpm.errors import MiniCPMError
from minicpm.files import check_output, publish_directory, temporary_directory_for

BATCH_BYTES = 1 << 19    # text per task sent to a worker: large enough to hide the hand-off, small enough to balance
THREADS_AT_MOST = 8      # more workers than this run as processes (see the module docstring)
Parallelism = Literal["auto", "threads", "processes"]


@dataclass
class SplitStats:
    """Counts of one split (or one source): documents, tokens (EOS included) and UTF-8 bytes of text."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0


@dataclass
class PrepareResult:
    """What `prepare` wrote and how long it took."""

    out: Path
    dtype: str
    splits: dict[str, SplitStats]
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def is_held_out(index: int, fraction: Fraction) -> bool:
    """Whether non-empty document `index` goes to the validation split (see the module docstring)."""
    p, q = fraction.numerator, fraction.denominator
    return ((index + 1) * p + q - p) // q > (index * p + q - p) // q


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Encoder:
    """Encodes a batch of documents to one flat array: each document's tokens, then the end-of-document id."""

    def __init__(self, tokenizer_json: str, eos: int, dtype: str):
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.encode_special_tokens = True  # '</s>' inside a document is text, not the EOS id
        self.eos, self.dtype = eos, np.dtype(dtype)
        self._encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = [e.ids for e in self._encode(texts, add_special_tokens=False)]
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for x in ids:
            tokens[pos:pos + len(x)] = x
            pos += len(x)
            tokens[pos] = self.eos
            pos += 1
        nbytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
        return tokens, lengths, nbytes


_worker = threading.local()  # the encoder of this worker thread, or of this worker process's one thread


def _init_worker(tokenizer_json: str, eos: int, dtype: str) -> None:
    _worker.encoder = _Encoder(tokenizer_json, eos, dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _worker.encoder(texts)


@contextmanager
def _tokenizers_serial() -> Iterator[None]:
    """Turns HF tokenizers' own thread pool off for a while (it reads the variable at every call; spawned workers
    inherit it), then puts the variable back as it was."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def uses_processes(workers: int, parallelism: Parallelism) -> bool:
    """Whether `workers` encoders run as processes rather than threads (see the module docstring)."""
    return parallelism == "processes" or (parallelism == "auto" and workers > THREADS_AT_MOST)


def _start_pool(workers: int, parallelism: Parallelism, encoder_args: tuple) -> multiprocessing.pool.Pool:
    if uses_processes(workers, parallelism):
        return multiprocessing.get_context("spawn").Pool(workers, _init_worker, encoder_args)
    return multiprocessing.pool.ThreadPool(workers, _init_worker, encoder_args)


class _Sink:
    """Routes encoded documents to the train or val shard writer and keeps the counts meta.json reports."""

    def __init__(self, root: Path, dtype: np.dtype, shard_tokens: int, sources: list[str], progress: bool):
        self.writers = {split: ShardWriter(root / split, dtype, shard_tokens) for split in ("train", "val")}
        self.stats = {split: SplitStats() for split in self.writers}
        self.per_source = {spec: SplitStats() for spec in sources}
        self.bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=None if progress else True, smoothing=0.1)

    def write(self, encoded: tuple[np.ndarray, np.ndarray, np.ndarray], splits: list[str], specs: list[str]) -> None:
        tokens, lengths, nbytes = encoded
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        start = 0
        for i in range(1, len(splits) + 1):  # runs of consecutive documents of one split go to its writer at once
            if i == len(splits) or splits[i] != splits[start]:
                split = splits[start]
                self.writers[split].add(tokens[bounds[start]:bounds[i]], lengths[start:i])
                self.stats[split].documents += i - start
                self.stats[split].tokens += int(bounds[i] - bounds[start])
                self.stats[split].bytes += int(nbytes[start:i].sum())
                start = i
        for spec, n in zip(specs, nbytes.tolist()):
            self.per_source[spec].documents += 1
            self.per_source[spec].bytes += n
        self.bar.update(int(nbytes.sum()))
        self.bar.set_postfix_str(f"{sum(s.tokens for s in self.stats.values()) / 1e6:.1f}M tokens", refresh=False)

    def close(self) -> dict[str, list]:
        self.bar.close()
        return {split: w.close() for split, w in self.writers.items()}

    def abort(self) -> None:
        self.bar.close()
        for w in self.writers.values():
            w.abort()


def prepare(sources: Sequence[str], tokenizer: str | Path, out: str | Path, *, val_fraction: float = 0.01,
            workers: int | None = None, options: SourceOptions | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False, progress: bool = True,
            batch_bytes: int = BATCH_BYTES, parallelism: Parallelism = "auto") -> PrepareResult:
    """Tokenize `sources` with `tokenizer` into a shard set at `out`; see the module docstring.

    `workers` defaults to one per available core; `parallelism` picks threads or processes ("auto": threads up to
    `THREADS_AT_MOST` workers)."""
    started = time.perf_counter()
    sources, out = list(sources), Path(out)
    if not sources:
        raise MiniCPMError("no sources given (a path, a glob, 'stdlib', 'jsonl:P', 'parquet:P' or 'hf:NAME')")
    if parallelism not in get_args(Parallelism):
        raise MiniCPMError(f"parallelism {parallelism!r}: must be one of {', '.join(get_args(Parallelism))}")
    if workers is not None and workers < 1:
        raise MiniCPMError(f"--workers {workers}: must be at least 1")
    if not 0 <= val_fraction < 1:
        raise MiniCPMError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise MiniCPMError(f"--shard-tokens {shard_tokens}: must be at least 1")
    check_output(out, inputs=[tokenizer, *(root for spec in sources for root in source_roots(spec))],
                 overwrite=overwrite)
    tok = load_tokenizer(tokenizer)
    vocab, eos = vocab_size(tok), eos_id(tok)
    dtype = token_dtype(vocab)
    encoder_args = (tok.to_str(), eos, dtype.name)

    tmp = temporary_directory_for(out, name=f".{out.name}.tmp-{os.getpid()}")
    sink = _Sink(tmp, dtype, shard_tokens, sources, progress)
    try:
        with _tokenizers_serial():
            skipped = _tokenize(sources, options, encoder_args, Fraction(val_fraction).limit_denominator(1_000_000),
                                workers or default_workers(), parallelism, batch_bytes, sink)
        train, val = sink.stats["train"], sink.stats["val"]
        if train.documents + val.documents == 0:
            raise MiniCPMError(f"{' '.join(sources)}: no documents (empty corpus)")
        if train.documents == 0:
            raise MiniCPMError(f"{' '.join(sources)}: {val.documents} document(s), all held out by --val-fraction "
                               f"{val_fraction}; nothing left to train on (use --val-fraction 0 or more data)")
        shards = sink.close()
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name,
            "tokenizer": {"hash": tokenizer_hash(tok), "vocab_size": vocab, "eos_id": eos, "source": str(tokenizer)},
            "document_format": "tokens + eos",
            "sources": [{"spec": spec, "documents": s.documents, "bytes": s.bytes}
                        for spec, s in sink.per_source.items()],
            "val_fraction": val_fraction,
            "skipped_empty_documents": skipped,
            "splits": {split: {"documents": s.documents, "tokens": s.tokens, "bytes": s.bytes,
                               "shards": [shard_entry(info) for info in shards[split]]}
                       for split, s in sink.stats.items() if s.documents},
        }
        (tmp / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        sink.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(out, dtype.name, sink.stats, time.perf_counter() - started)


def _tokenize(sources: list[str], options: SourceOptions | None, encoder_args: tuple, fraction: Fraction,
              workers: int, parallelism: Parallelism, batch_bytes: int, sink: _Sink) -> int:
    """Read, encode (by `workers` threads or processes) and write every document; returns how many empty ones were skipped.

    The pool starts with the first full batch, so a corpus smaller than one batch is encoded in this process.
    """
    pool = local = None
    pending: deque = deque()

    def submit(texts: list[str], splits: list[str], specs: list[str], last: bool) -> None:
        nonlocal pool, local
        if pool is None and workers > 1 and not last:
            pool = _start_pool(workers, parallelism, encoder_args)
        if pool is None:
            local = local or _Encoder(*encoder_args)
            sink.write(local(texts), splits, specs)
            return
        pending.append((pool.apply_async(_encode_in_worker, (texts,)), splits, specs))
        while len(pending) > 2 * workers + 2 or (last and pending):
            result, done_splits, done_specs = pending.popleft()
            sink.write(result.get(), done_splits, done_specs)

    try:
        index = skipped = size = 0
        texts, splits, specs = [], [], []
        for spec, doc in iter_corpus(sources, options):
            if not doc.text:
                skipped += 1
                continue
            texts.append(doc.text)
            splits.append("val" if fraction and is_held_out(index, fraction) else "train")
            specs.append(spec)
            index += 1
            size += len(doc.text)
            if size >= batch_bytes:
                submit(texts, splits, specs, last=False)
                texts, splits, specs, size = [], [], [], 0
        submit(texts, splits, specs, last=True)
        return skipped
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MiniCPMError(f"{out}: appeared while preparing (choose another --out, or pass --overwrite)")
    publish_directory(tmp, out)
