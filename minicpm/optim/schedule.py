"""Learning-rate schedules as pure functions of the step (DESIGN section 3).

Each returns the factor that multiplies the base learning rate η. A checkpoint stores the step, never a
scheduler object, so resuming or branching a decay from any checkpoint needs nothing but the step.

Conventions, shared by every schedule:
- warmup: step s < W gives (s+1)/W, so the LR is positive at step 0 and reaches η at step W-1;
- a decay of D steps that starts at T counts k = s-T+1 steps into the decay, so the first decay step already
  decays and the last one (k = D) lands exactly on the floor for the finite decays (linear, cosine, 1-sqrt);
- a floor φ (a fraction of η) is reached as φ + (1-φ)·f(k) with f going from 1 to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minicpm.errors import MiniCPMError

DECAYS = ("exp", "linear", "cosine", "1-sqrt")
KINDS = ("wsd", "cosine", "constant")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: (s+1)/W for s < W, then 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def decay_shape(kind: str, k: float, decay_steps: int, half_life: float) -> float:
    """f(k) in [0, 1] for k steps into a decay of decay_steps steps: 1 at k = 0, decreasing."""
    if kind == "exp":
        # paper section 6.2: f(s-T) = 0.5^((s-T)/T_half), half-life 5000 steps for the released models
        return 0.5 ** (k / half_life)
    progress = min(1.0, k / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise MiniCPMError(f"schedule.decay: unknown decay {kind!r}; choose one of: {', '.join(DECAYS)}")


def wsd_schedule(step: int, *, warmup_steps: int, decay_start: int, decay_steps: int, decay: str = "exp",
                 half_life: float | None = None, floor: float = 0.0) -> float:
    """Warmup-Stable-Decay (paper section 4.3): warm up to η, hold η until decay_start, then decay.

    The exponential decay never reaches its floor; half_life defaults to decay_steps/5 (the paper's decay of
    ~0.1T tokens is ~5 half-lives of 5000 steps). After decay_start + decay_steps the factor stays where the
    decay ended.
    """
    if step < decay_start:
        return warmup_factor(step, warmup_steps)
    k = min(step - decay_start + 1, decay_steps)
    f = decay_shape(decay, k, decay_steps, half_life or decay_steps / 5)
    return floor + (1.0 - floor) * f


def cosine_schedule(step: int, *, warmup_steps: int, period: int, floor: float = 0.1) -> float:
    """Cosine from η to floor·η over `period` steps after warmup, then flat at the floor.

    The paper's Cosine(T) (appendix B.1, with its printed sign erratum corrected) uses a 10% floor; its
    period T may be shorter or longer than the run, which is how the paper compares T = S with T ≠ S.
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps + 1) / max(1, period - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_schedule(step: int, *, warmup_steps: int) -> float:
    """Warmup, then η for ever (a WSD run's stable phase with its decay left for a later branch)."""
    return warmup_factor(step, warmup_steps)


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: every default filled in, callable as factor = schedule(step)."""

    kind: str
    total_steps: int
    warmup_steps: int
    decay_start: int
    decay_steps: int
    decay: str
    half_life: float
    floor: float
    period: int

    def __call__(self, step: int) -> float:
        if self.kind == "wsd":
            return wsd_schedule(step, warmup_steps=self.warmup_steps, decay_start=self.decay_start,
                                decay_steps=self.decay_steps, decay=self.decay, half_life=self.half_life,
                                floor=self.floor)
        if self.kind == "cosine":
            return cosine_schedule(step, warmup_steps=self.warmup_steps, period=self.period, floor=self.floor)
        return constant_schedule(step, warmup_steps=self.warmup_steps)

    def in_decay(self, step: int) -> bool:
        """Whether a step belongs to the decay stage (where the decay data mixture is used)."""
        return self.kind == "wsd" and step >= self.decay_start

    def describe(self) -> str:
        if self.kind == "wsd":
            tail = f"half-life {self.half_life:g} steps" if self.decay == "exp" else f"to {self.floor:g}·lr"
            return (f"WSD: warmup {self.warmup_steps}, stable to step {self.decay_start}, {self.decay} decay "
                    f"for {self.decay_steps} steps ({tail}), {self.total_steps} steps in all")
        if self.kind == "cosine":
            return (f"cosine: warmup {self.warmup_steps}, period {self.period} steps to {self.floor:g}·lr, "
                    f"{self.total_steps} steps in all")
        return f"constant: warmup {self.warmup_steps}, then lr for {self.total_steps} steps"


def resolve_schedule(*, kind: str, total_steps: int, warmup_steps: int, decay_steps: int | None,
                     decay_start: int | None, decay: str, half_life: float | None, floor: float | None,
                     cosine_period: int | None) -> Schedule:
    """Fill in the defaults and check consistency; errors name the `schedule.*` key at fault."""
    if kind not in KINDS:
        raise MiniCPMError(f"schedule.kind: unknown schedule {kind!r}; choose one of: {', '.join(KINDS)}")
    if decay not in DECAYS:
        raise MiniCPMError(f"schedule.decay: unknown decay {decay!r}; choose one of: {', '.join(DECAYS)}")
    if total_steps <= 0:
        raise MiniCPMError(f"schedule.total_steps must be positive, got {total_steps}")
    if warmup_steps < 0:
        raise MiniCPMError(f"schedule.warmup_steps must be >= 0, got {warmup_steps}")
    if half_life is not None and not (math.isfinite(half_life) and half_life > 0):
        raise MiniCPMError(f"schedule.half_life must be a positive number, got {half_life}")
    if floor is not None and not 0.0 <= floor < 1.0:
        raise MiniCPMError(f"schedule.floor must be in [0, 1), got {floor}")
    if kind == "wsd":
        if decay_start is not None and decay_steps is not None and decay_start + decay_steps != total_steps:
            raise MiniCPMError(f"schedule.decay_start ({decay_start}) + schedule.decay_steps ({decay_steps}) must "
                               f"equal schedule.total_steps ({total_steps}); give only one of them")
        if decay_start is None and decay_steps is not None and not 0 <= decay_steps <= total_steps:
            raise MiniCPMError(f"schedule.decay_steps must be in [0, total_steps={total_steps}], got {decay_steps}")
        if decay_start is None:
            # paper section 4.3: a decay of ~10% of the tokens is enough (2.5% falls short)
            decay_steps = max(1, round(0.1 * total_steps)) if decay_steps is None else decay_steps
            decay_start = total_steps - decay_steps
        decay_steps = total_steps - decay_start
        if not 0 <= decay_start <= total_steps:
            raise MiniCPMError(f"schedule.decay_start must be in [0, total_steps={total_steps}], got {decay_start}")
        if decay_start < warmup_steps and decay_steps > 0:
            raise MiniCPMError(f"schedule: the decay starts at step {decay_start}, inside the warmup of "
                               f"{warmup_steps} steps; lower schedule.warmup_steps or schedule.decay_steps")
    else:
        decay_start, decay_steps = total_steps, 0
    period = cosine_period if cosine_period is not None else total_steps
    if period <= 0:
        raise MiniCPMError(f"schedule.cosine_period must be positive, got {period}")
    default_floor = 0.1 if kind == "cosine" else 0.0  # paper appendix B.1: cosine keeps 10% of η
    return Schedule(kind=kind, total_steps=total_steps, warmup_steps=warmup_steps, decay_start=decay_start,
                    decay_steps=decay_steps, decay=decay,
                    half_life=float(half_life if half_life is not None else max(decay_steps, 1) / 5),
                    floor=default_floor if floor is None else floor, period=period)

