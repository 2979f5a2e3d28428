"""The pretraining data a run trains on: the stable-stage and decay-stage mixtures of token shards (paper
section 5, two-stage pretraining), turned into next-token batches, and the facts of the run's tokenizer.

A data source hands out whole global batches, deterministically in the step and its saved state, so that every
process draws the same batch (and takes its own rows of it) and a resumed run continues the same stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from minicpm.data import IGNORE_INDEX
from minicpm.errors import MiniCPMError


class DataSource(Protocol):
    """Where global batches come from: deterministic in the step and the saved state."""

    def next_batch(self, step: int, sequences: int) -> dict[str, torch.Tensor]: ...

    def check_token_ids(self, vocab_size: int) -> None:
        """A sample of every dataset's ids below the model's vocabulary (before the first step, not mid-run)."""
        for mixture in (self.stable, self.decay):
            for dataset in (mixture.datasets if mixture is not None else ()):
                dataset.check_token_ids(vocab_size)

    def skipped_too_long(self) -> dict[str, int]:
        """Per chat dataset of either stage, its conversations too long for a row of seq_len + 1 (never trained)."""
        skipped: dict[str, int] = {}
        for mixture in (self.stable, self.decay):
            skipped.update(mixture.skipped_too_long if mixture is not None else {})
        return skipped

    def stage(self, step: int) -> str:
        """The name of the training stage a step belongs to (logged with each metrics line)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


PACKING = ("concat", "document")


def rows_to_batch(rows: torch.Tensor, loss_mask: torch.Tensor | None = None,
                  doc_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Packed rows of seq_len+1 tokens → inputs and next-token labels.

    loss_mask (same shape): a label whose token is no target (a chat prompt) becomes IGNORE_INDEX. doc_ids: the
    batch carries them (the model then keeps documents apart), and no label crosses into another document (its
    first token cannot be predicted from a document it does not see)."""
    batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
    if loss_mask is None and doc_ids is None:
        return batch
    ignore = torch.zeros_like(batch["labels"], dtype=torch.bool)
    if loss_mask is not None:
        ignore |= ~loss_mask[:, 1:]
    if doc_ids is not None:
        ignore |= doc_ids[:, 1:] != doc_ids[:, :-1]
        batch["doc_ids"] = doc_ids[:, :-1]
    batch["labels"] = batch["labels"].masked_fill(ignore, IGNORE_INDEX)
    return batch


def mixture_batch(mixture, sequences: int, packing: str = "concat") -> dict[str, torch.Tensor]:
    """The mixture's next `sequences` rows as a batch: plain next-token rows unless chat data (a loss mask) or
    document packing asks for the layout."""
    if packing == "concat" and not mixture.has_loss_mask:
        return rows_to_batch(mixture.next_batch(sequences))
    rows = mixture.next_rows(sequences)
    return rows_to_batch(rows["tokens"], rows["loss_mask"], rows["doc_ids"] if packing == "document" else None)


class PretrainData:
    """The stable-stage and decay-stage mixtures; the schedule says which stage a step belongs to. Without a decay
    mixture the stable one continues through the decay.

    At its first step the decay mixture takes over each shared dataset's reading position from the stable one,
    so the decay does not revisit what the stable stage read; a decay branched from a checkpoint at step N thus
    sees the same data as the run's own decay starting at N would.
    """

    def __init__(self, stable: dict[str, float], decay: dict[str, float] | None, schedule, *, seq_len: int,
                 seed: int, tokenizer_hash: str | None = None, packing: str = "concat"):
        from minicpm.data.mixture import Mixture

        if not stable:
            raise MiniCPMError("data.stable is empty: give at least one prepared dataset directory, "
                               "e.g. data.stable={path/to/shards: 1.0}")
        if packing not in PACKING:
            raise MiniCPMError(f"data.packing: {packing!r}, expected one of {', '.join(PACKING)}")
        self.schedule, self.packing = schedule, packing
        self.stable = Mixture(dict(stable), seq_len=seq_len, seed=seed, tokenizer_hash=tokenizer_hash)
        self.decay = (Mixture(dict(decay), seq_len=seq_len, seed=seed, tokenizer_hash=tokenizer_hash)
                      if decay else None)
        self.decay_started = False

    def stage(self, step: int) -> str:
        return "decay" if self.decay is not None and self.schedule.in_decay(step) else "stable"

    def next_batch(self, step: int, sequences: int) -> dict[str, torch.Tensor]:
        if self.stage(step) == "stable":
            return mixture_batch(self.stable, sequences, self.packing)
        if not self.decay_started:
            self.decay.load_state_dict(self.stable.state_dict(), streams_only=True)
            self.decay_started = True
        return mixture_batch(self.decay, sequences, self.packing)

    def state_dict(self) -> dict[str, Any]:
        return {"stable": self.stable.state_dict(),
                "decay": self.decay.state_dict() if self.decay_started else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stable.load_state_dict(state["stable"])
        if state.get("decay") is not None and self.decay is not None:
            self.decay.load_state_dict(state["decay"])
            self.decay_started = True


def tokenizer_facts(path: str | None) -> tuple[str | None, int | None]:
    """(hash, vocabulary size) of a run's tokenizer, or (None, None) without one."""
    if not path:
        return None, None
    from minicpm.data.tokenizer import load_tokenizer, tokenizer_hash, vocab_size

    tokenizer = load_tokenizer(path)
    return tokenizer_hash(tokenizer), vocab_size(tokenizer)


def dataset_names(paths: list[str]) -> list[str]:
    """Each dataset's directory name, or its whole path where two names would clash."""
    names = [Path(p).name or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]
