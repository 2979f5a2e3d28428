"""Held-out answer loss: the evaluator of kind `answer_loss` (SFT's measure of progress).

Each chat dataset's validation conversations are packed whole into rows (never cut), kept apart by document
attention, and the loss is the mean cross-entropy over their answer tokens (and the end-of-turn token that closes
each), as the `sft` objective trains it, whatever the run's own objective or packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from minicpm.errors import MiniCPMError
from minicpm.eval.evaluators import EvalSetup, EvalTarget, register_evaluator


@dataclass
class AnswerLossOptions:
    """Options of the held-out answer loss evaluator."""

    datasets: Optional[List[str]] = None
    """Chat datasets (made by `minicpm prepare --format chat`) whose validation split is evaluated; null: every
    chat dataset of both stages."""
    conversations: int = 256
    """Held-out conversations per dataset at most (the first ones of its validation split, the same every time)."""
    batch_size: Optional[int] = None
    """Rows per forward pass; null: batch.micro_batch_size."""
    headline: bool = True
    """Also write the mean answer loss as eval_answer_loss (shown on the training log line)."""

    def aliases(self) -> dict[str, str]:
        return {"answer_loss": "eval_answer_loss"} if self.headline else {}


def packed_conversations(path: str, seq_len: int, max_conversations: int, split: str = "val",
                         tokenizer_hash: str | None = None) -> dict[str, torch.Tensor]:
    """The first max_conversations documents of a chat dataset's split, packed whole and in order into rows of
    seq_len + 1 tokens: {"tokens", "loss_mask", "doc_ids"}. The rest of a row is filler of its own document with
    no target; a conversation longer than a row is left out."""
    from minicpm.data.shards import open_dataset

    ds = open_dataset(path, split)
    if not ds.has_loss_mask:
        raise MiniCPMError(f"{path}: not chat data (no loss mask); the answer_loss evaluator reads datasets made by "
                           f"`minicpm prepare --format chat`")
    if tokenizer_hash is not None and ds.tokenizer_hash != tokenizer_hash:
        raise MiniCPMError(f"{path}: made with tokenizer {ds.tokenizer_hash}, this run's is {tokenizer_hash}")
    width, eos = seq_len + 1, int(ds.meta["tokenizer"]["eos_id"])
    rows: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    used = 0
    for i in range(min(max_conversations, len(ds))):
        doc = ds.document(i)
        if len(doc) > width:
            continue
        mask = ds.loss_mask(int(ds.doc_starts[i]), int(ds.doc_starts[i + 1]))
        if not rows or used + len(doc) > width:
            rows.append(([], []))
            used = 0
        rows[-1][0].append(doc.astype(np.int64))
        rows[-1][1].append(mask)
        used += len(doc)
    tokens = np.full((len(rows), width), eos, dtype=np.int64)
    masks = np.zeros((len(rows), width), dtype=bool)
    docs = np.empty((len(rows), width), dtype=np.int64)
    for r, (parts, flags) in enumerate(rows):
        at = 0
        for d, (part, flag) in enumerate(zip(parts, flags)):
            tokens[r, at:at + len(part)], masks[r, at:at + len(part)], docs[r, at:at + len(part)] = part, flag, d
            at += len(part)
        docs[r, at:] = len(parts)
    return {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(masks), "doc_ids": torch.from_numpy(docs)}


@torch.no_grad()
def answer_loss_sum(target: EvalTarget, rows: dict[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
    """Summed answer-token loss (nats) and the number of answer tokens over packed rows, over every process."""
    from minicpm.data.pretrain import rows_to_batch

    total = torch.zeros(2, dtype=torch.float64, device=target.device)
    n = rows["tokens"].shape[0]
    per_rank = n // target.world_size
    first = target.rank * per_rank
    for start in range(first, first + per_rank, batch_size):
        stop = min(start + batch_size, first + per_rank)
        batch = rows_to_batch(rows["tokens"][start:stop], rows["loss_mask"][start:stop], rows["doc_ids"][start:stop])
        loss_sum, count = target.eval_step(batch, "sft")["loss"]
        total[0] += loss_sum.double()
        total[1] += float(count)
    total = target.all_reduce(total)
    return float(total[0]), int(total[1])


@register_evaluator("answer_loss", options=AnswerLossOptions)
class AnswerLoss:
    """{"answer_loss"} (mean over the datasets, each counting once) and "<set>/answer_loss" per chat dataset."""

    def __init__(self, name: str, every: int, options: AnswerLossOptions, setup: EvalSetup):
        from minicpm.data.pretrain import dataset_names
        from minicpm.data.shards import read_meta

        cfg = setup.config
        self.name, self.every, self.aliases = name, every, options.aliases()
        self.batch_size = options.batch_size or cfg.batch.micro_batch_size
        dirs = options.datasets if options.datasets is not None else \
            [d for d in dict.fromkeys([*cfg.data.stable, *(cfg.data.decay or {})]) if read_meta(d).get("loss_mask")]
        if not dirs:
            raise MiniCPMError(f"evaluator {name} (answer_loss): no chat dataset in data.stable or data.decay; "
                               f"name some with `datasets:`")
        self.sets = {set_name: packed_conversations(path, cfg.batch.seq_len, options.conversations,
                                                    tokenizer_hash=setup.tokenizer_hash)
                     for set_name, path in zip(dataset_names(dirs), dirs)}
        for set_name, rows in self.sets.items():
            if not rows["loss_mask"].any():
                raise MiniCPMError(f"evaluator {name} (answer_loss): {set_name} has no held-out conversation of at "
                                   f"most batch.seq_len + 1 = {cfg.batch.seq_len + 1} tokens to measure")

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        out: dict[str, float] = {}
        for set_name, rows in self.sets.items():
            loss_sum, count = answer_loss_sum(target, rows, self.batch_size)
            out[f"{set_name}/answer_loss"] = loss_sum / max(count, 1)
        if out:
            out["answer_loss"] = sum(out.values()) / len(out)
        return out
