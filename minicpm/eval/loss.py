"""Held-out loss and bits per byte.

Bits per byte divide a token loss by the bytes a token stands for, so models with different tokenizers compare
(the paper's scaling fits use loss per byte, section 4.5, following GPT-4).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from minicpm.train.losses import lm_loss


@torch.no_grad()
def heldout_loss_sum(model, rows: torch.Tensor, *, batch_size: int, device: torch.device,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     chunk_size: int | None = None) -> tuple[float, int]:
    """Summed next-token loss (nats) and the number of predicted tokens over rows of shape (n, seq_len+1)."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start:start + batch_size].to(device, non_blocking=True)
        with autocast():
            hidden = model.hidden_states(chunk[:, :-1])
            total += lm_loss(hidden, model.head_weight, chunk[:, 1:], chunk_size=chunk_size).double()
        count += chunk[:, 1:].numel()
    return float(total), count


def evaluate(model, datasets: Mapping[str, torch.Tensor], bytes_per_token: Mapping[str, float], *,
             batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             chunk_size: int | None = None) -> dict[str, float]:
    """Loss and bits per byte on each held-out set, and their means over the sets (each set counts once).

    Under several processes each takes an equal contiguous slice of every set's rows (a remainder of fewer rows
    than processes is left out, so every process runs the same forward passes) and the sums are all-reduced.
    Returns {"eval_loss", "eval_bpb", "eval/NAME/loss", "eval/NAME/bpb", ...}.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for name, rows in datasets.items():
            per_rank = rows.shape[0] // world_size
            mine = rows[rank * per_rank:(rank + 1) * per_rank]
            loss_sum, count = heldout_loss_sum(model, mine, batch_size=batch_size, device=device, autocast=autocast,
                                               chunk_size=chunk_size)
            if world_size > 1:
                sums = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
                dist.all_reduce(sums)
                loss_sum, count = float(sums[0]), int(sums[1])
            loss = loss_sum / max(count, 1)
            out[f"eval/{name}/loss"] = loss
            out[f"eval/{name}/bpb"] = loss / math.log(2) / bytes_per_token[name]
    finally:
        model.train(was_training)
    if datasets:
        names = list(datasets)
        out["eval_loss"] = sum(out[f"eval/{n}/loss"] for n in names) / len(names)
        out["eval_bpb"] = sum(out[f"eval/{n}/bpb"] for n in names) / len(names)
    return out
