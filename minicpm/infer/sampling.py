"""Choosing the next token from a batch of logits: repetition penalty, then temperature, top-k, top-p and min-p, then
greedy or seeded sampling.

Each step is defined as transformers defines it (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, applied in that order), so that a setting means here what it
means there; tests check each against transformers on random logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from minicpm.errors import MiniCPMError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. The defaults sample from the model's own distribution."""

    temperature: float = 1.0
    """0 is greedy decoding (the arg-max after the repetition penalty); above 0 divides the logits."""
    top_k: int = 0
    """keep only the k most likely tokens; 0 keeps all"""
    top_p: float = 1.0
    """keep the most likely tokens whose probabilities add up to top_p (nucleus sampling); 1 keeps all"""
    min_p: float = 0.0
    """drop tokens less likely than min_p times the most likely one; 0 keeps all"""
    repetition_penalty: float = 1.0
    """divide positive (multiply negative) logits of every token already in the prompt or the output (CTRL,
    Keskar et al. 2019); 1 is off"""

    def __post_init__(self):
        bad = None
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad = f"temperature {self.temperature} is not a finite number >= 0 (0 is greedy)"
        elif not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            bad = f"top_k {self.top_k} is not an integer >= 0 (0 keeps every token)"
        elif not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            bad = f"top_p {self.top_p} is not in (0, 1]"
        elif not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p < 1.0):
            bad = f"min_p {self.min_p} is not in [0, 1)"
        elif not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                  and self.repetition_penalty > 0):
            bad = f"repetition_penalty {self.repetition_penalty} is not a finite number > 0 (1 is off)"
        if bad:
            raise MiniCPMError(f"generate: {bad}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, vocab) with every token marked in seen (B, vocab, bool) made less likely: positive logits divided
    by the penalty, negative ones multiplied by it (so that a penalty > 1 always lowers them)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf for every token below the k-th largest logit of its row (ties with it stay)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """-inf for every token whose probability, together with all the less likely ones, adds up to at most 1 - p:
    what is left is the smallest most-likely set holding at least p of the mass (the most likely token always)."""
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_up_to <= 1.0 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """-inf for every token less likely than min_p times its row's most likely token (Nguyen et al. 2024); with
    min_p < 1 the most likely token always stays."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, in transformers' order (min-p after temperature)."""
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    logits = keep_top_k(logits, sampling.top_k)
    logits = keep_top_p(logits, sampling.top_p)
    return keep_min_p(logits, sampling.min_p)


def next_tokens(logits: torch.Tensor, sampling: Sampling,
                generators: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token id per row (B,) from fp32 logits (B, vocab) that already carry the repetition penalty.

    generators: one generator for the whole batch, one per row (then a row's draws do not depend on the other
    rows, so a row samples the same in any batch), or None (torch's global generator).
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = warp(logits, sampling).softmax(dim=-1)
    if generators is None or isinstance(generators, torch.Generator):
        return torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])
