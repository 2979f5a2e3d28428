"""The WSD method (paper section 4.3): one stable run, and decays branched from its checkpoints. Because the
stable phase does not depend on when the decay will start, every checkpoint of one stable run can be decayed into
a finished model of that many tokens, at the cost of the decay alone.

Each run is an ordinary run directory trained by the library's one loop; running a step again picks up where it
stopped (a finished run resumes to "nothing left to do").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from minicpm.train.config import TrainConfig
from minicpm.rundir import RunDir, checkpoint_name, is_complete
from minicpm.train.launch import launch_config
from minicpm.train.loop import TrainResult, train


def train_stable_stages(config: str | Path, overrides: Sequence[str], run_dir: str | Path,
                        stages: Sequence[int]) -> TrainResult | None:
    """The stable phase (a constant LR after warmup) in stages: each stage ends on a checkpoint, and an eval, at the
    next step of `stages`; a stage already checkpointed is skipped. A constant schedule does not depend on its
    length, so the stages train exactly one uninterrupted run (paper section 4.3)."""
    result = None
    for step in stages:
        if is_complete(RunDir(run_dir).checkpoint_dir(step)):
            continue
        cfg = launch_config(str(config), [*overrides, f"schedule.total_steps={step}"], out=str(run_dir), resume=True)
        result = train(cfg, resume=True, allow_config_change=True)  # each stage lengthens the run: recorded
    return result


def branch_decay(source: str | Path, decay_steps: int, out: str | Path, *, overrides: Sequence[str] = (),
                 decay: str | None = None, half_life: float | None = None) -> TrainResult:
    """Decay the checkpoint `source` (or a run's latest) over decay_steps steps into the new run directory `out`,
    on the source run's config (its data.decay mixture) with `overrides`; resumes `out` if it was interrupted."""
    cfg = launch_config(None, list(overrides), out=str(out), resume=True, init_from=str(source),
                        decay_steps=decay_steps, decay=decay, half_life=half_life)
    return train(cfg, resume=True)


@dataclass
class StableAndDecays:
    stable: TrainResult
    decays: dict[int, TrainResult] = field(default_factory=dict)
    """{branch step: the decay branched there}."""

    @property
    def runs(self) -> list[Path]:
        return [self.stable.run_dir, *(d.run_dir for d in self.decays.values())]


def stable_with_decays(stable: TrainConfig, decay_at: Sequence[int], decay_steps: int, out: str | Path, *,
                       decay_overrides: Sequence[str] = (), on_branch=None) -> StableAndDecays:
    """Train (or resume) the stable run `stable`, then branch a decay of decay_steps from its checkpoint at each
    step of decay_at into OUT/decay-from-<step> (each step must be one the stable run checkpoints).
    on_branch(step, out) is told before each branch starts."""
    result = StableAndDecays(train(stable, resume=True))
    source = RunDir(stable.run.out_dir)
    for step in decay_at:
        target = Path(out) / f"decay-from-{step}"
        if on_branch is not None:
            on_branch(step, target)
        result.decays[step] = branch_decay(source.checkpoints_dir / checkpoint_name(step), decay_steps, target,
                                           overrides=decay_overrides)
    return result
