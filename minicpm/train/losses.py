"""Training losses. Language modelling takes the final hidden state and the head weight, so that a chunked
implementation can avoid materialising the (tokens x vocab) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
            chunk_size: int | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != IGNORE_INDEX (divide by the token count outside).

    hidden: (B, T, d) final normed, muP-scaled hidden states; head_weight: (vocab, d); labels: (B, T).
    """
    logits = F.linear(hidden, head_weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
