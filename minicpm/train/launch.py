"""From what a user asks on the command line to the TrainConfig of a run: a fresh run, a resumed one, a stable
phase continued from a checkpoint, or a decay branched from one (paper section 4.3: one stable run, many decays).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from minicpm.checkpoints.verify import resolve_verified
from minicpm.errors import MiniCPMError
from minicpm.rundir import RunDir, run_of
from minicpm.train.config import TrainConfig, load_config, validate


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`minicpm train`'s positional arguments: an optional YAML recipe first, then key=value overrides."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None and not overrides:
            config = item
        else:
            raise MiniCPMError(f"{item!r}: expected key=value (only the first argument may be a CONFIG file)")
    return config, overrides


def launch_config(config: str | Path | None, overrides: list[str], *, out: str | None = None, resume: bool = False,
                  init_from: str | Path | None = None, decay_steps: int | None = None, decay: str | None = None,
                  half_life: float | None = None, strict: bool = False) -> TrainConfig:
    """The config of the run to start.

    config: a YAML recipe. Without one, a resumed run reads RUN/config.yaml and a run started --from a checkpoint
    reads its source run's config.yaml. overrides (key=value) apply on top. init_from with decay_steps M branches
    a decay: the new run continues the checkpoint's step N with a WSD schedule whose decay takes steps N..N+M.
    strict: refuse checkpoints without a manifest (run.strict_checkpoints).
    """
    if decay_steps is not None and init_from is None:
        raise MiniCPMError("--decay-steps branches a decay from a checkpoint: give --from RUN/checkpoints/step_N "
                           "(or set schedule.decay_steps for a run's own decay)")
    if init_from is not None:
        # a named checkpoint must verify; a run: its newest that does
        source, state = resolve_verified(init_from, _warn, strict=strict)
        if not out:
            raise MiniCPMError("--from needs --out NEW_RUN: a branch or continuation gets its own run directory")
        source_run = run_of(source).path
        if Path(out).resolve() == source_run.resolve():
            raise MiniCPMError(f"--out {out} is the source run: a branch never writes into its source; "
                               f"choose a new directory")
        recipe = Path(config) if config else run_of(source).config_file
        if not recipe.is_file():
            raise MiniCPMError(f"{recipe}: no such config; give the source run's config as CONFIG")
        cfg = load_config(recipe, overrides)
        cfg.run.init_from = str(source)
        if decay_steps is not None:
            if decay_steps <= 0:
                raise MiniCPMError(f"--decay-steps must be positive, got {decay_steps}")
            step = state["step"]
            cfg.schedule = dataclasses.replace(cfg.schedule, kind="wsd", total_steps=step + decay_steps,
                                               decay_steps=decay_steps, decay_start=None)
    elif config is None:
        if not (resume and out):
            raise MiniCPMError("give a CONFIG (a YAML recipe), or --resume --out RUN to continue a run")
        recipe = RunDir(out).config_file
        if not recipe.is_file():
            raise MiniCPMError(f"{recipe}: no such file; {out} is not a run directory")
        cfg = load_config(recipe, overrides)
    else:
        cfg = load_config(config, overrides)
    if out:
        cfg.run.out_dir = str(out)
    if strict:
        cfg.run.strict_checkpoints = True
    if decay is not None:
        cfg.schedule.decay = decay
    if half_life is not None:
        cfg.schedule.half_life = half_life
    validate(cfg)
    return cfg


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone
        print(f"warning: {message}", file=sys.stderr, flush=True)
