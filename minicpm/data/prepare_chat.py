"""`minicpm prepare --format chat`: chat JSONL → token shards with a loss-mask channel (layout in
`minicpm.data.shards`), so that chat data trains alone (SFT) or in the decay-stage mixture next to plain text
(paper section 5, two-stage pretraining).

Each conversation is rendered with a chat template (`minicpm.data.chat`) into one document: its ids, closed by the
end-of-document id, with a mask that is true on the answer tokens. The whole file is checked as it is read: a bad
line (unknown role, empty assistant turn, invalid JSON, a prompt that leaves no room for an answer within seq_len)
stops the run with its file:line and nothing is written. A conversation longer than seq_len + 1 tokens is skipped
and counted (meta.json "skipped_too_long"), as a user trimming a corpus to a context length expects.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from minicpm.data.chat import get_template, read_chat_jsonl, render_conversation
from minicpm.data.prepare import PrepareResult, SplitStats, is_held_out
from minicpm.data.shards import DEFAULT_SHARD_TOKENS, FORMAT, VERSION, ShardWriter, shard_entry, token_dtype
from minicpm.data.sources import expand_paths  # a file, a directory or a glob
from minicpm.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash, vocab_size
from minicpm.errors import MiniCPMError
from minicpm.files import check_output, publish_directory, temporary_directory_for


def prepare_chat(sources: Sequence[str], tokenizer: str | Path, out: str | Path, *, template: str | None = "minicpm",
                 seq_len: int = 2048, val_fraction: float = 0.01, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 overwrite: bool = False) -> PrepareResult:
    """Render and tokenize the conversations of chat JSONL `sources` into a shard set at `out`; the result's
    `skipped_too_long` counts the conversations longer than seq_len + 1 tokens."""
    if not sources:
        raise MiniCPMError("no chat sources given (JSONL files with 'messages' or 'prompt'/'response' per line)")
    if seq_len < 1:
        raise MiniCPMError(f"--seq-len {seq_len}: must be at least 1")
    tok = load_tokenizer(tokenizer)
    chat = get_template(template, Path(tokenizer))
    eos = eos_id(tok)
    files = [p for spec in sources for p in expand_paths(spec)]

    def documents():
        for file in files:
            for where, messages in read_chat_jsonl(file):
                ids, mask = render_conversation(messages, chat, tok)
                if not ids or ids[-1] != eos:  # every document ends with the end-of-document id (not a target)
                    ids, mask = ids + [eos], mask + [False]
                first_target = mask.index(True)
                if first_target > seq_len:
                    raise MiniCPMError(f"{where}: the prompt is {first_target} tokens, longer than --seq-len "
                                       f"{seq_len}: no answer token fits in a training sequence")
                yield str(file), ids, mask, sum(len(m["content"].encode("utf-8")) for m in messages)

    return write_masked_shards(
        documents(), tok, tokenizer, out, seq_len=seq_len, val_fraction=val_fraction, shard_tokens=shard_tokens,
        overwrite=overwrite, sources=[str(f) for f in files], label=" ".join(sources), empty_hint="conversation",
        meta={"document_format": "chat: rendered conversation + eos, loss mask per token", "chat": chat.describe()})


def write_masked_shards(documents: Iterable[tuple[str, list[int], list[bool], int]], tok, tokenizer: str | Path,
                        out: str | Path, *, meta: dict, seq_len: int | None = None, val_fraction: float = 0.01,
                        shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False,
                        sources: Sequence[str] = (), label: str | None = None,
                        empty_hint: str = "document") -> PrepareResult:
    """Write (source, ids, loss mask, UTF-8 bytes) documents, each ending with the end-of-document id, as a shard set
    with a loss-mask channel at `out` (atomically: a failure, also one raised by `documents`, leaves nothing). Such
    data trains in rows of whole documents (`minicpm.data.chat_rows`). With seq_len, documents longer than
    seq_len + 1 tokens are skipped and counted. `meta` adds fields to meta.json (document_format, chat, ...);
    `sources` orders its per-source counts; `label` names the input in errors."""
    started = time.perf_counter()
    out = Path(out)
    if not 0 <= val_fraction < 1:
        raise MiniCPMError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise MiniCPMError(f"--shard-tokens {shard_tokens}: must be at least 1")
    check_output(out, inputs=[tokenizer, *sources], overwrite=overwrite)
    vocab, eos = vocab_size(tok), eos_id(tok)
    dtype = token_dtype(vocab)
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)

    tmp = temporary_directory_for(out, name=f".{out.name}.tmp-{os.getpid()}")
    writers = {split: ShardWriter(tmp / split, dtype, shard_tokens, loss_mask=True) for split in ("train", "val")}
    stats = {split: SplitStats() for split in writers}
    per_source = {source: SplitStats() for source in sources}
    too_long = index = 0
    try:
        for source, ids, mask, nbytes in documents:
            if seq_len is not None and len(ids) > seq_len + 1:
                too_long += 1
                continue
            split = "val" if fraction and is_held_out(index, fraction) else "train"
            index += 1
            writers[split].add(np.asarray(ids), np.asarray([len(ids)]), np.asarray(mask))
            for s in (stats[split], per_source.setdefault(source, SplitStats())):
                s.documents += 1
                s.tokens += len(ids)
                s.bytes += nbytes
        train, val = stats["train"], stats["val"]
        if train.documents == 0:
            longer = f", {too_long} longer than --seq-len {seq_len}" if seq_len is not None else ""
            raise MiniCPMError(f"{label or out}: no {empty_hint} left to train on ({val.documents} held "
                               f"out{longer})")
        shards = {split: w.close() for split, w in writers.items()}
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name,
            "tokenizer": {"hash": tokenizer_hash(tok), "vocab_size": vocab, "eos_id": eos, "source": str(tokenizer)},
            "loss_mask": True,
            **meta,
            **({"seq_len": seq_len} if seq_len is not None else {}),
            "sources": [{"spec": spec, "documents": s.documents, "bytes": s.bytes} for spec, s in per_source.items()],
            "val_fraction": val_fraction,
            "skipped_empty_documents": 0,
            "skipped_too_long": too_long,
            "splits": {split: {"documents": s.documents, "tokens": s.tokens, "bytes": s.bytes,
                               "shards": [shard_entry(info) for info in shards[split]]}
                       for split, s in stats.items() if s.documents},
        }
        (tmp / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists() and not overwrite:
            raise MiniCPMError(f"{out}: appeared while preparing (choose another --out, or pass --overwrite)")
        publish_directory(tmp, out)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = PrepareResult(out, dtype.name, stats, time.perf_counter() - started)
    result.skipped_too_long = too_long
    return result


def dataset_template(path: str | Path):
    """The chat template a prepared chat dataset (or DPO pairs directory) was rendered with, or None for plain
    text."""
    from minicpm.data.chat import ChatTemplate
    from minicpm.data.pairs import FORMAT as PAIRS_FORMAT
    from minicpm.data.shards import read_meta

    try:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not (isinstance(meta, dict) and meta.get("format") == PAIRS_FORMAT):  # pairs: DPO checks them itself
        meta = read_meta(path)
    return ChatTemplate.from_description(meta["chat"]) if isinstance(meta.get("chat"), dict) else None


def training_template(paths):
    """The chat template of the first chat dataset among `paths` (a run's data.stable, then data.decay), or None
    when all are plain text: the template a run's checkpoints carry."""
    for path in paths:
        found = dataset_template(path)
        if found is not None:
            return found
    return None
