"""Verdicts on a paper's claims from measurements over seeds: holds, does not hold, or inconclusive, with the
interval that decided it (what `minicpm reproduce` reports for each finding).

Each claim is judged from one number per seed (a paired difference, or the shift of an optimum), through the
two-sided Student-t interval of their mean at `confidence`: the claim holds when the whole interval lies on its
side of the threshold, does not hold when the whole interval lies on the other side, and is inconclusive when the
interval straddles the threshold (more seeds, or a larger effect, would decide it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.laws import CONFIDENCE

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    claim: str
    outcome: str
    """HOLDS, FAILS or INCONCLUSIVE."""
    estimate: float
    """The mean over seeds of the judged quantity."""
    interval: tuple[float, float]
    """Its t-interval at `confidence` (a point when every seed measured the same)."""
    threshold: str
    """What the interval was held against, in words (≤ 0.02; within ±1)."""
    seeds: int
    confidence: float

    def line(self) -> str:
        low, high = self.interval
        return (f"{self.claim}: {self.outcome} (mean {self.estimate:.4g}, {self.confidence:.0%} interval "
                f"[{low:.4g}, {high:.4g}] against {self.threshold}, {self.seeds} seeds)")


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """The mean of per-seed values and its two-sided Student-t interval (n − 1 degrees of freedom)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) < 2:
        raise MiniCPMError(f"a verdict needs one value per seed from at least 2 seeds, got {len(np.atleast_1d(x))}")
    if not np.all(np.isfinite(x)):
        raise MiniCPMError(f"a verdict needs finite measurements, got {x.tolist()}")
    if not 0 < confidence < 1:
        raise MiniCPMError(f"confidence must lie in (0, 1), got {confidence!r}")
    mean, spread = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(len(x))
    if spread == 0.0:
        return mean, (mean, mean)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1)) * spread
    return mean, (mean - half, mean + half)


def at_most(a: Sequence[float], b: Sequence[float], *, margin: float = 0.0, confidence: float = CONFIDENCE,
            claim: str = "A <= B + margin") -> Verdict:
    """The claim a ≤ b + margin, from paired per-seed measurements (a[i] and b[i] from seed i: e.g. the WSD and the
    cosine loss at equal tokens): the interval of the mean difference a − b against the margin."""
    if len(a) != len(b):
        raise MiniCPMError(f"{claim}: paired measurements need as many seeds on each side, got {len(a)} and {len(b)}")
    mean, (low, high) = mean_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), confidence)
    outcome = HOLDS if high <= margin else FAILS if low > margin else INCONCLUSIVE
    return Verdict(claim, outcome, mean, (low, high), f"<= {margin:g}", len(a), confidence)


def optimum_moves_at_most(optima_from: Sequence[float], optima_to: Sequence[float], *, doublings: float,
                          confidence: float = CONFIDENCE, claim: str = "the optimum moves <= k doublings") -> Verdict:
    """The claim that an optimum (a learning rate, a batch size) moves by at most `doublings` factors of 2 between two
    settings (two widths, say), from per-seed optima: the interval of the mean log2(to/from) against ±doublings."""
    if len(optima_from) != len(optima_to):
        raise MiniCPMError(f"{claim}: per-seed optima need as many seeds on each side, got {len(optima_from)} and "
                           f"{len(optima_to)}")
    before, after = np.asarray(optima_from, dtype=float), np.asarray(optima_to, dtype=float)
    if np.any(before <= 0) or np.any(after <= 0):
        raise MiniCPMError(f"{claim}: optima must be positive, got {before.tolist()} and {after.tolist()}")
    if doublings < 0:
        raise MiniCPMError(f"{claim}: doublings must be >= 0, got {doublings!r}")
    mean, (low, high) = mean_interval(np.log2(after / before), confidence)
    inside = -doublings <= low and high <= doublings
    outside = low > doublings or high < -doublings
    outcome = HOLDS if inside else FAILS if outside else INCONCLUSIVE
    return Verdict(claim, outcome, mean, (low, high), f"within ±{doublings:g} doublings", len(before), confidence)
