"""Held-out loss and bits per byte: the evaluator of kind `heldout`.

Bits per byte divide a token loss by the bytes a token stands for, so models with different tokenizers compare
(the paper's scaling fits use loss per byte, section 4.5, following GPT-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from minicpm.eval.evaluators import EvalSetup, EvalTarget, register_evaluator


@dataclass
class HeldoutOptions:
    """Options of the held-out loss evaluator."""

    datasets: Optional[List[str]] = None
    """Prepared dataset directories whose validation split is evaluated; null: every dataset of both stages."""
    sequences: Optional[int] = None
    """Held-out sequences per dataset (the same rows at every evaluation); null: data.eval_sequences."""
    batch_size: Optional[int] = None
    """Sequences per forward pass; null: batch.micro_batch_size."""
    headline: bool = True
    """Also write the mean loss and bits per byte as eval_loss and eval_bpb (what sweeps, fits and reports read)."""
    objective: Optional[str] = field(default="next_token")
    """The objective the loss is measured under (null: the run's own)."""

    def aliases(self) -> dict[str, str]:
        return {"loss": "eval_loss", "bpb": "eval_bpb"} if self.headline else {}


def split_rows(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's equal, contiguous slice of a set's rows (a remainder of fewer rows than processes is left out,
    so every process runs the same forward passes)."""
    per_rank = rows.shape[0] // world_size
    return rows[rank * per_rank:(rank + 1) * per_rank]


def eos_doc_ids(rows: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Documents numbered along each row, a document ending at (and including) its end-of-document id."""
    ends = (rows == eos_id).long()
    return ends.cumsum(dim=1) - ends


@torch.no_grad()
def heldout_loss_sum(target: EvalTarget, rows: torch.Tensor, *, batch_size: int,
                     objective: str | None = "next_token", eos_id: int | None = None) -> tuple[float, int]:
    """Summed next-token loss (nats) and the number of predicted tokens over rows of shape (n, seq_len+1), summed
    over every process's rows. With eos_id (data.packing: document) the documents of a row are kept apart as in
    training."""
    from minicpm.data.pretrain import rows_to_batch

    total = torch.zeros(2, dtype=torch.float64, device=target.device)
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start:start + batch_size]
        batch = rows_to_batch(chunk) if eos_id is None else rows_to_batch(chunk, doc_ids=eos_doc_ids(chunk, eos_id))
        loss_sum, count = target.eval_step(batch, objective)["loss"]
        total[0] += loss_sum.double()
        total[1] += float(count)
    total = target.all_reduce(total)
    return float(total[0]), int(total[1])


@register_evaluator("heldout", options=HeldoutOptions)
class HeldoutLoss:
    """Loss and bits per byte on each dataset's held-out split, and their means over the sets (each set counts
    once): {"loss", "bpb", "<set>/loss", "<set>/bpb"}. Under several processes each takes an equal slice of every
    set's rows and the sums are all-reduced."""

    def __init__(self, name: str, every: int, options: HeldoutOptions, setup: EvalSetup):
        from minicpm.data.mixture import bytes_per_token, validation_batches
        from minicpm.data.pretrain import dataset_names
        from minicpm.data.shards import read_meta

        cfg = setup.config
        self.name, self.every, self.options = name, every, options
        self.aliases = options.aliases()
        self.batch_size = options.batch_size or cfg.batch.micro_batch_size
        sequences = cfg.data.eval_sequences if options.sequences is None else options.sequences
        dirs = options.datasets if options.datasets is not None else \
            list(dict.fromkeys([*cfg.data.stable, *(cfg.data.decay or {})]))
        self.sets: dict[str, torch.Tensor] = {}
        self.bytes_per_token: dict[str, float] = {}
        self.eos_ids: dict[str, int | None] = {}
        if not sequences:
            return
        for set_name, path in zip(dataset_names(dirs), dirs):
            self.sets[set_name] = validation_batches([path], seq_len=cfg.batch.seq_len, max_sequences=sequences,
                                                     tokenizer_hash=setup.tokenizer_hash)
            self.bytes_per_token[set_name] = bytes_per_token([path])
            # leak-free packing in training: the held-out rows' documents kept apart too
            self.eos_ids[set_name] = (read_meta(path)["tokenizer"]["eos_id"] if cfg.data.packing == "document"
                                      else None)

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        out: dict[str, float] = {}
        for set_name, rows in self.sets.items():
            mine = split_rows(rows, target.rank, target.world_size)
            loss_sum, count = heldout_loss_sum(target, mine, batch_size=self.batch_size,
                                               objective=self.options.objective, eos_id=self.eos_ids[set_name])
            loss = loss_sum / max(count, 1)
            out[f"{set_name}/loss"] = loss
            out[f"{set_name}/bpb"] = loss / math.log(2) / self.bytes_per_token[set_name]
        if self.sets:
            names = list(self.sets)
            out["loss"] = sum(out[f"{n}/loss"] for n in names) / len(names)
            out["bpb"] = sum(out[f"{n}/bpb"] for n in names) / len(names)
        return out
