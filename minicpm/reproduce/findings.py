"""What each part of `minicpm reproduce` concludes: the paper's claim, the verdicts computed from the runs (each
with its interval), the numbers behind them, the figure, and notes on why a finding may not hold at this size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minicpm.laws.verdict import FAILS, HOLDS, INCONCLUSIVE, Verdict

NOT_MEASURED = "not measured"
OUTCOMES = (HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED)


@dataclass
class Finding:
    part: int
    key: str
    title: str
    paper: str
    """The paper's claim, with where it is made."""
    verdicts: list[Verdict] = field(default_factory=list)
    """The first is the finding's own; the others qualify it (a contrast arm, a second claim)."""
    numbers: dict[str, Any] = field(default_factory=dict)
    figure: str | None = None
    """The figure's path relative to OUT."""
    notes: list[str] = field(default_factory=list)
    """What the verdict rests on and, where it does not hold, why we think so."""
    missing: list[str] = field(default_factory=list)
    """Runs that did not finish (failed or diverged): the finding is judged without them, or not at all."""
    sample: str = "seeds"
    """What a verdict's interval is over (its `seeds` counts them): seeds, or the held-out points of a fit."""

    @property
    def outcome(self) -> str:
        return self.verdicts[0].outcome if self.verdicts else NOT_MEASURED

    def to_json(self) -> dict[str, Any]:
        return {"part": self.part, "key": self.key, "title": self.title, "paper": self.paper, "outcome": self.outcome,
                "verdicts": [verdict_json(v) for v in self.verdicts], "numbers": self.numbers,
                "figure": self.figure, "notes": self.notes, "missing": self.missing, "interval_over": self.sample}


def verdict_json(v: Verdict) -> dict[str, Any]:
    return {"claim": v.claim, "outcome": v.outcome, "estimate": v.estimate, "interval": list(v.interval),
            "threshold": v.threshold, "seeds": v.seeds, "confidence": v.confidence}


def not_measured(part: int, key: str, title: str, paper: str, why: str, missing=()) -> Finding:
    return Finding(part, key, title, paper, notes=[why], missing=list(missing))
