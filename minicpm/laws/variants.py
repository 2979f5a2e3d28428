"""The forms of L(N, D) `minicpm scaling fit --law` offers, all E + A/N^alpha + B/D^beta fitted by Huber on log loss
(Chinchilla approach 3), differing in what they constrain or weight:

- chinchilla: every parameter free (Hoffmann et al. 2022, approach 3).
- shared: one exponent for N and D, alpha = beta (Gadre et al. 2024, "Language models scale reliably with
  over-training": their law L(C, M) = E + (a·M^eta + b·M^-eta)·C^-eta is this form written in compute C = 6ND and
  tokens per parameter M = D/N; one fewer parameter for a few points to pin down).
- weighted: free exponents, each run weighted by its compute 6ND (relative to the mean), and E bounded by the
  lowest loss of the table: the largest runs, nearest to where the law is used, count most.
- shared-weighted: both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minicpm.errors import MiniCPMError


@dataclass(frozen=True)
class LawVariant:
    name: str
    description: str
    shared_exponent: bool = False
    """alpha = beta: one exponent (Gadre et al. 2024)."""
    compute_weighted: bool = False
    """Each point's Huber term weighted by its compute 6ND over the mean compute."""
    e_below_min_loss: bool = False
    """E may not exceed the lowest loss of the table (without it, up to the highest)."""

    def weights(self, params: np.ndarray, tokens: np.ndarray) -> np.ndarray | None:
        if not self.compute_weighted:
            return None
        compute = np.asarray(params, dtype=float) * np.asarray(tokens, dtype=float)
        return compute / compute.mean()


VARIANTS = {v.name: v for v in (
    LawVariant("chinchilla", "every parameter free"),
    LawVariant("shared", "alpha = beta, one exponent (Gadre et al. 2024)", shared_exponent=True),
    LawVariant("weighted", "runs weighted by compute, E <= the lowest loss", compute_weighted=True,
               e_below_min_loss=True),
    LawVariant("shared-weighted", "alpha = beta, runs weighted by compute, E <= the lowest loss",
               shared_exponent=True, compute_weighted=True, e_below_min_loss=True),
)}
DEFAULT_LAW = "shared"
"""The law `scaling fit` and campaign fits use unless told: of the four, it extrapolates best in N. Fitted on the
runs of Gadre et al. 2024 below 0.5B parameters (C4 validation loss, all their token multipliers), it predicts their
1.4B and 6.9B runs (3.5x and 17x larger) with mean |error| 0.18% trained on RedPajama (chinchilla 1.83%), 0.48% on
RefinedWeb (2.14%) and 2.19% on C4 (3.44%), each inside its 90% band but C4's 6.9B; on synthetic campaigns drawn
from laws with alpha != beta it extrapolates no worse than chinchilla (benchmarks/scaling_law_extrapolation.py).
The weighted forms extrapolate worse on every table tried. Its cost: alpha = beta makes the compute-optimal
N and D grow as C^0.5 by construction, so the allocation's exponents need --law chinchilla (the planner's law)."""


def law_variant(name: str) -> LawVariant:
    if name not in VARIANTS:
        raise MiniCPMError(f"--law {name!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
