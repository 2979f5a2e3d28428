"""Weighted mixtures of prepared datasets, packed into fixed-length training sequences; resumable.

A `Mixture` holds one stream per dataset. Each epoch a stream lays the dataset's documents out in a shuffled
order (a fresh order each epoch, fixed by the seed and the dataset's checksums), packs their tokens,
end-of-document ids included, into windows of seq_len + 1 tokens (inputs = w[:-1], labels = w[1:]) and hands the
windows out in a pseudo-random order of their own. Neighbouring windows of the layout share one token (the last
label of one is the first input of the next), so every next-token pair of an epoch's layout is trained on exactly
once and each sequence brings seq_len new tokens; the fewer than seq_len tokens left at the end of the layout are
skipped that epoch (other tokens are skipped the next, as the documents are reshuffled). Permuting the windows,
not only the documents, matters when documents are long: consecutive windows of one layout come from one or two
documents, so a batch of them would see a handful of files; permuted, a batch draws on the whole dataset.

Chat data (a loss-mask channel, `minicpm prepare --format chat`) is not cut into windows: its stream hands out
rows of whole conversations (`minicpm.data.chat_rows`), so no answer loses its prompt; a row is seq_len + 1 tokens
like a window, so the weights below count it alike (filler included).

The window order is a keyed Feistel permutation of [0, windows) with cycle walking: any window count, O(1)
memory and O(1) work a window, so a dataset of billions of tokens needs no array over its windows (the
document order costs one int64 array a document, as the document offsets already do); the state is an
(epoch, position) pair, never the permutation.

Which dataset a sequence comes from follows the weights by deficit round-robin: every draw adds each dataset's
integer share to its credit and takes the dataset with the most credit, which then pays one full round. After n
draws each dataset's count is within one sequence per dataset of n·weight, and since every sequence holds the
same number of new tokens, weights count tokens. Every sequence of a global batch is drawn this way; the trainer
slices the batch per rank.

Two-stage pretraining (paper Sec. 4: a stable-stage mix, then a decay-stage mix with high-quality data) uses two
Mixtures over the datasets; `load_state_dict(state, streams_only=True)` lets the decay mix go on reading each
dataset where the stable mix stopped. The state is plain JSON (ints, strings, lists): it lives in
trainer_state.json.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from minicpm.data.shards import TokenDataset, open_dataset
from minicpm.errors import MiniCPMError

STATE_VERSION = 2  # 2: windows in a permuted order, positions as (epoch, position)
WEIGHT_QUANTUM = 1 << 20  # weights become integer shares of this total, so the schedule is exact integer arithmetic
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 over uint64 arrays: a fixed, platform- and numpy-version-independent shuffle key."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _fingerprint(ds: TokenDataset) -> str:
    """Identifies a split by its content (shard checksums), not by where it lies on disk."""
    info = ds.meta["splits"][ds.split]
    h = hashlib.sha256(ds.split.encode())
    for shard in info["shards"]:
        h.update(shard["sha256_bin"].encode())
    return h.hexdigest()[:16]


def _mix64(x: int) -> int:
    """SplitMix64 finaliser over one Python int (the scalar twin of `_splitmix64`)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class _WindowOrder:
    """A pseudo-random permutation of [0, n), keyed: a balanced Feistel network over the smallest even number of
    bits that holds n, with cycle walking (re-encrypt until the value falls below n; fewer than 4 rounds on
    average as the domain is under 4n). A bijection whatever the round function, so no window is skipped or
    repeated within an epoch."""

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64((key + r * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) for r in range(self.ROUNDS)]

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"window position {i} outside [0, {self.n})")
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class _Stream:
    """One dataset's windows: per epoch, its documents packed in a shuffled order, the windows taken in a
    pseudo-random order."""

    def __init__(self, name: str, ds: TokenDataset, seed: int, seq_len: int):
        self.windows = (ds.num_tokens - 1) // seq_len if ds.num_tokens else 0
        if self.windows == 0:
            raise MiniCPMError(f"{name}: the '{ds.split}' split holds {ds.num_tokens} tokens, fewer than one window "
                               f"of {seq_len + 1} (add data or shorten seq_len)")
        self.name, self.ds, self.seed, self.seq_len = name, ds, seed, seq_len
        self.fingerprint = _fingerprint(ds)
        self.epoch = self.position = 0  # the next window is the epoch's position-th in the permuted order
        self.sequences = 0
        self._layout_epoch = -1
        self._order = self._ends = None
        self._windows_order: _WindowOrder | None = None

    def _key(self, epoch: int, salt: int) -> int:
        return (self.seed * 0x100000001B3 + int(self.fingerprint, 16) + epoch * 0x9E3779B1 + salt) & ((1 << 64) - 1)

    def _layout(self, epoch: int) -> None:
        """The epoch's document order, where each document ends in the packed layout, and its window order."""
        if self._layout_epoch == epoch:
            return
        keys = _splitmix64(np.arange(self.ds.num_documents, dtype=np.uint64)
                           ^ _splitmix64(np.array([self._key(epoch, 0)], dtype=np.uint64))[0])
        self._order = np.argsort(keys, kind="stable")
        self._ends = np.cumsum(self.ds.document_lengths()[self._order])
        self._windows_order = _WindowOrder(self.windows, _mix64(self._key(epoch, 0x5851F42D4C957F2D)))
        self._layout_epoch = epoch

    def _tokens(self, start: int, n: int, layout: bool = False):
        """Tokens [start, start + n) of the current epoch's packed layout; with `layout`, also each token's loss
        mask (all true: plain text) and the number of its document within the window (0, 1, ...)."""
        out = np.empty(n, dtype=np.int64)
        mask = np.empty(n, dtype=bool) if layout else None
        docs = np.empty(n, dtype=np.int64) if layout else None
        k = int(np.searchsorted(self._ends, start, side="right"))
        filled = part = 0
        while filled < n:
            doc = int(self._order[k])
            doc_start = int(self._ends[k]) - int(self.ds.doc_starts[doc + 1] - self.ds.doc_starts[doc])
            a = int(self.ds.doc_starts[doc]) + start + filled - doc_start
            m = min(n - filled, int(self.ds.doc_starts[doc + 1]) - a)
            out[filled:filled + m] = self.ds.tokens(a, a + m)
            if layout:
                mask[filled:filled + m] = self.ds.loss_mask(a, a + m)
                docs[filled:filled + m] = part
            filled += m
            part += 1
            k += 1
        return (out, mask, docs) if layout else out

    def window(self, layout: bool = False):
        """The next window's tokens (seq_len + 1); with `layout`, (tokens, loss mask, document numbers)."""
        if self.position == self.windows:
            self.epoch, self.position = self.epoch + 1, 0
        self._layout(self.epoch)
        w = self._windows_order[self.position]
        self.position += 1
        self.sequences += 1
        return self._tokens(w * self.seq_len, self.seq_len + 1, layout)

    def state(self) -> dict:
        return {"fingerprint": self.fingerprint, "epoch": self.epoch, "position": self.position,
                "sequences": self.sequences}

    def load(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.sequences = int(state["sequences"])


class _ConversationStream(_Stream):
    """A chat dataset's rows of whole conversations (`minicpm.data.chat_rows`), packed once, handed out in a
    pseudo-random order of their own each epoch; every answer token of a conversation that fits a row is a target
    exactly once per epoch."""

    def __init__(self, name: str, ds: TokenDataset, seed: int, seq_len: int):
        from minicpm.data.chat_rows import ConversationRows

        self.rows = ConversationRows(name, ds, seq_len)
        self.windows = len(self.rows)
        self.name, self.ds, self.seed, self.seq_len = name, ds, seed, seq_len
        self.fingerprint = _fingerprint(ds)
        self.epoch = self.position = self.sequences = 0
        self._order_epoch, self._rows_order = -1, None

    def window(self, layout: bool = False):
        if self.position == self.windows:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._rows_order = _WindowOrder(self.windows, _mix64(self._key(self.epoch, 0x5851F42D4C957F2D)))
            self._order_epoch = self.epoch
        tokens, mask, docs = self.rows.row(self._rows_order[self.position])
        self.position += 1
        self.sequences += 1
        return (tokens, mask, docs) if layout else tokens


def _stream(name: str, ds: TokenDataset, seed: int, seq_len: int) -> _Stream:
    """Chat data comes in rows of whole conversations, plain text in windows over its packed documents."""
    return (_ConversationStream if ds.has_loss_mask else _Stream)(name, ds, seed, seq_len)


def _open_all(paths: Iterable[str], split: str, tokenizer_hash: str | None) -> dict[str, TokenDataset]:
    """Open each dataset's split; all must come from one tokenizer (and `tokenizer_hash`, when given)."""
    opened: dict[str, TokenDataset] = {}
    for name in paths:
        ds = open_dataset(name, split)
        if tokenizer_hash is not None and ds.tokenizer_hash != tokenizer_hash:
            raise MiniCPMError(f"{name}: made with tokenizer {ds.tokenizer_hash}, but this run's tokenizer is "
                               f"{tokenizer_hash} (prepare it again with the run's tokenizer)")
        for other, other_ds in opened.items():
            if other_ds.tokenizer_hash != ds.tokenizer_hash:
                raise MiniCPMError(f"{name}: made with tokenizer {ds.tokenizer_hash}, but {other} with "
                                   f"{other_ds.tokenizer_hash}; a mixture needs one tokenizer")
        opened[name] = ds
    if not opened:
        raise MiniCPMError("a mixture needs at least one dataset")
    return opened


def _shares(weights: Mapping[str, float]) -> list[int]:
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise MiniCPMError(f"{name}: weight {w!r} must be a finite number >= 0")
    total = float(sum(weights.values()))
    if total <= 0:
        raise MiniCPMError(f"mixture weights {dict(weights)} sum to 0; give at least one dataset a positive weight")
    return [max(1, round(w / total * WEIGHT_QUANTUM)) if w > 0 else 0 for w in weights.values()]


class Mixture:
    """Sequences of seq_len + 1 tokens drawn from weighted datasets; deterministic from `seed`, resumable.

    `datasets` maps a prepared dataset directory to its weight (weights count tokens and need not sum to 1).
    """

    def __init__(self, datasets: Mapping[str | Path, float], *, seq_len: int, seed: int, split: str = "train",
                 tokenizer_hash: str | None = None):
        if seq_len < 1:
            raise MiniCPMError(f"seq_len {seq_len}: must be at least 1")
        weights = {str(k): v for k, v in datasets.items()}
        self.seq_len, self.seed, self.split = int(seq_len), int(seed), split
        self.names = list(weights)
        self.weights = {name: float(w) for name, w in weights.items()}
        self._shares = _shares(weights)
        opened = _open_all(self.names, split, tokenizer_hash)
        self.tokenizer_hash = next(iter(opened.values())).tokenizer_hash
        self._streams = [_stream(name, opened[name], self.seed, self.seq_len) for name in self.names]
        self._credits = [0] * len(self.names)

    @property
    def datasets(self) -> list[TokenDataset]:
        return [stream.ds for stream in self._streams]

    def _draw(self) -> int:
        total = sum(self._shares)
        self._credits = [c + s for c, s in zip(self._credits, self._shares)]
        pick = max(range(len(self._credits)), key=lambda i: (self._credits[i], -i))
        self._credits[pick] -= total
        return pick

    def next_batch(self, n_sequences: int) -> torch.Tensor:
        """The next n_sequences windows, a LongTensor (n_sequences, seq_len + 1)."""
        batch = np.empty((n_sequences, self.seq_len + 1), dtype=np.int64)
        for row in range(n_sequences):
            batch[row] = self._streams[self._draw()].window()
        return torch.from_numpy(batch)

    @property
    def skipped_too_long(self) -> dict[str, int]:
        """Per chat dataset, its conversations longer than seq_len + 1 tokens, which no row can hold whole."""
        return {s.name: s.rows.skipped_too_long for s in self._streams if isinstance(s, _ConversationStream)}

    @property
    def has_loss_mask(self) -> bool:
        """Whether any dataset is chat data (a loss-mask channel)."""
        return any(stream.ds.has_loss_mask for stream in self._streams)

    def next_rows(self, n_sequences: int) -> dict[str, torch.Tensor]:
        """The next n_sequences windows as next_batch draws them, with their layout: {"tokens" (n, seq_len + 1),
        "loss_mask" (bool: a training target; all true for plain text), "doc_ids" (each window's documents
        numbered 0, 1, ... along it)}."""
        shape = (n_sequences, self.seq_len + 1)
        tokens, mask, docs = np.empty(shape, np.int64), np.empty(shape, bool), np.empty(shape, np.int64)
        for row in range(n_sequences):
            tokens[row], mask[row], docs[row] = self._streams[self._draw()].window(layout=True)
        return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask),
                "doc_ids": torch.from_numpy(docs)}

    def sequences_drawn(self) -> dict[str, int]:
        """How many sequences each dataset has given so far (for logging the realised mix)."""
        return {s.name: s.sequences for s in self._streams}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seq_len": self.seq_len, "seed": self.seed, "split": self.split,
                "shares": list(self._shares), "credits": list(self._credits),
                "datasets": [dict(name=s.name, **s.state()) for s in self._streams]}

    def load_state_dict(self, state: dict, *, streams_only: bool = False) -> None:
        """Continue exactly where `state` stopped. With streams_only, take only the reading positions of the
        datasets both mixtures share (matched by content), e.g. to start the decay mix where the stable mix was."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise MiniCPMError(f"data sampler state: version {state.get('version') if isinstance(state, dict) else None!r}, "
                               f"expected {STATE_VERSION}")
        for key in ("seq_len", "seed", "split"):
            if state[key] != getattr(self, key):
                raise MiniCPMError(f"data sampler state: {key} {state[key]!r}, this mixture has {getattr(self, key)!r}")
        saved = {d["fingerprint"]: d for d in state["datasets"]}
        if streams_only:
            for stream in self._streams:
                if stream.fingerprint in saved:
                    stream.load(saved[stream.fingerprint])
            return
        mine = [s.fingerprint for s in self._streams]
        theirs = [d["fingerprint"] for d in state["datasets"]]
        if mine != theirs:
            names = [d["name"] for d in state["datasets"]]
            raise MiniCPMError(f"data sampler state is for datasets {names} (content {theirs}); this mixture has "
                               f"{self.names} (content {mine})")
        if list(state["shares"]) != self._shares:
            raise MiniCPMError(f"data sampler state: weights {dict(zip(self.names, state['shares']))} (in 2^-20), "
                               f"this mixture has {dict(zip(self.names, self._shares))}")
        for stream, d in zip(self._streams, state["datasets"]):
            stream.load(d)
        self._credits = [int(c) for c in state["credits"]]


def validation_batches(datasets: Iterable[str | Path] | Mapping[str | Path, float], *, seq_len: int,
                       max_sequences: int, split: str = "val", tokenizer_hash: str | None = None) -> torch.Tensor:
    """A fixed held-out set: windows of seq_len + 1 tokens of each dataset's `split` (in document order), up to
    max_sequences shared evenly between datasets; a dataset's windows are spaced evenly over its whole split, so a
    small set samples all of it rather than its first few documents.

    Only whole windows are used; a dataset whose split cannot fill one window is an error.
    """
    names = [str(d) for d in datasets]
    opened = _open_all(names, split, tokenizer_hash)
    quota = [max_sequences // len(names) + (1 if i < max_sequences % len(names) else 0) for i in range(len(names))]
    rows = []
    for (name, ds), want in zip(opened.items(), quota):
        available = (ds.num_tokens - 1) // seq_len
        if available == 0:
            raise MiniCPMError(f"{name}: the '{split}' split holds {ds.num_tokens} tokens, fewer than one window of "
                               f"{seq_len + 1} (raise --val-fraction or shorten seq_len)")
        n = min(want, available)
        # window i * available // n for i < n: distinct, evenly spaced, the first at the split's start
        rows += [ds.tokens(w * seq_len, w * seq_len + seq_len + 1).astype(np.int64)
                 for w in (i * available // n for i in range(n))]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, seq_len + 1, dtype=torch.long)


def bytes_per_token(datasets: Iterable[str | Path] | Mapping[str | Path, float], split: str = "val") -> float:
    """UTF-8 bytes per token over the datasets' `split`, pooled (EOS tokens count as tokens of no bytes):
    bits per byte = mean loss in nats per token / ln 2 / bytes_per_token."""
    opened = _open_all([str(d) for d in datasets], split, None)
    tokens = sum(ds.num_tokens for ds in opened.values())
    return sum(ds.num_bytes for ds in opened.values()) / max(tokens, 1)
