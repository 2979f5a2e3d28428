"""Whole conversations packed into training rows: SFT's layout of chat data (made by `minicpm prepare --format chat`).

A fixed window over concatenated conversations starts inside one of them; that conversation has lost its prompt,
so its answer tokens in the window cannot be targets (17% of the answer tokens of the stdlib docstring chat data at
seq_len 256). Here every row of seq_len + 1 tokens holds whole conversations and the rest of the row is filler, so
each answer token of each conversation that fits in a row is a target exactly once per epoch.

Rows are packed once per dataset, best-fit decreasing (longest conversation first, each into the row it fills the
most; a new row when none has room), which leaves little filler, and the same rows come back each epoch in a new
order. Filler is the end-of-document id, never a target and a document of its own, so under document packing it
attends to nothing before it. A conversation longer than a row cannot be trained whole and is skipped and counted,
as `minicpm prepare --format chat` does for its own --seq-len.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Sequence

import numpy as np

from minicpm.data.shards import TokenDataset
from minicpm.errors import MiniCPMError


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, width: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `width`; every length must be at most
    width. Deterministic (ties go to the lower index). Rows are kept by how much room they have left, and a row's
    room is at most `width`, so each placement costs a search among at most `width` room values, whatever the
    number of rows."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths, dtype=np.int64)))
    rows: list[list[int]] = []
    rooms: list[int] = []                 # the distinct room values some row has, ascending
    by_room: dict[int, list[int]] = {}    # room -> the rows with exactly that much room
    for i in order.tolist():
        n = int(lengths[i])
        if not 0 < n <= width:
            raise ValueError(f"length {n} does not fit a row of {width}")
        at = bisect_left(rooms, n)  # the least room that still holds n: the best fit
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, row = width, len(rows)
            rows.append([])
        rows[row].append(i)
        if room > n:
            if room - n not in by_room:
                insort(rooms, room - n)
                by_room[room - n] = []
            by_room[room - n].append(row)
    return rows


class ConversationRows:
    """A chat dataset's conversations packed whole into rows of seq_len + 1 tokens."""

    def __init__(self, name: str, ds: TokenDataset, seq_len: int):
        if not ds.has_loss_mask:
            raise MiniCPMError(f"{name}: not chat data (meta.json has no loss mask); whole-conversation rows are "
                               f"for datasets made by `minicpm prepare --format chat`")
        self.ds, self.width = ds, seq_len + 1
        self.eos = int(ds.meta["tokenizer"]["eos_id"])
        lengths = ds.document_lengths()
        fits = np.flatnonzero(lengths <= self.width)
        self.skipped_too_long = len(lengths) - len(fits)
        if len(fits) == 0:
            raise MiniCPMError(f"{name}: every one of its {len(lengths)} '{ds.split}' conversations is longer than "
                               f"seq_len + 1 = {self.width} tokens (raise batch.seq_len or prepare shorter ones)")
        self.rows = [fits[r] for r in best_fit_decreasing(lengths[fits], self.width)]

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row i: its tokens, loss mask (True on answer tokens) and document numbers (0, 1, ... along the row; the
        filler is one more document)."""
        tokens = np.full(self.width, self.eos, dtype=np.int64)
        mask = np.zeros(self.width, dtype=bool)
        docs = np.empty(self.width, dtype=np.int64)
        at = 0
        for part, doc in enumerate(self.rows[i].tolist()):
            start, stop = int(self.ds.doc_starts[doc]), int(self.ds.doc_starts[doc + 1])
            tokens[at:at + stop - start] = self.ds.tokens(start, stop)
            mask[at:at + stop - start] = self.ds.loss_mask(start, stop)
            docs[at:at + stop - start] = part
            at += stop - start
        docs[at:] = len(self.rows[i])
        return tokens, mask, docs
