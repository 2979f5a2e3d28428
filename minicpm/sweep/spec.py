"""The sweep spec (`minicpm sweep SPEC.yaml`): what to train, which keys to vary, how to search, what to optimise.

    base: {config: proxy.yaml, overrides: [schedule.total_steps=200]}   # the training recipe, relative to SPEC
    space:                                   # dotted config key -> a list of choices, or a range
      optim.lr: {low: 1.0e-3, high: 1.0e-1, log: true}
      model.scale_emb: [6, 12, 24]
      model.num_hidden_layers: {low: 2, high: 8}    # int bounds: an int range
      batch.tokens_per_step+schedule.total_steps: [[2048, 400], [4096, 200]]   # keys joined by +: values together
    sampler: tpe                             # grid | random | tpe (Optuna)
    trials: 20                               # finished trials wanted (grid: default and at most the grid's size)
    metric: eval_loss                        # a metrics.jsonl key; its last value is the trial's result
    direction: minimize
    workers: 2                               # local parallel trials (default: cores / threads)
    threads: 1                               # torch threads per trial (OMP_NUM_THREADS)
    pruner: median                           # or hyperband, or {kind: median, n_startup_trials: 2, ...}
    seed: 0
    name: my-sweep                           # the study's name (default: the spec file's stem)
    trial_launcher: torchrun                 # process (default: a forked `minicpm train`) | torchrun
    nproc_per_node: 2                        # torchrun: processes per trial (GPUs, or gloo CPU processes)

Every error is one line naming the spec file and key; nothing is written before the spec is valid.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from minicpm.errors import MiniCPMError
from minicpm.specs import (Accepts, NonEmptyStr, Number, PositiveInt, Recipe, Scalar, override_value, read_spec,
                           resolve_recipe, spec_error, typed)

SAMPLERS = ("grid", "random", "tpe")
DIRECTIONS = ("minimize", "maximize")
PRUNERS = ("median", "hyperband")
TRIAL_LAUNCHERS = ("process", "torchrun")
TIE = "+"
"""Joins space keys whose values are chosen together."""


@dataclass(frozen=True)
class Param:
    """One dimension of the space: `choices`, or a [low, high] range (ints when both bounds are ints)."""

    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)

    def describe(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass
class SweepSpec:
    path: Path
    config: Path
    overrides: list[str]
    space: dict[str, Param]
    sampler: str = "tpe"
    trials: int = 10
    metric: str = "eval_loss"
    direction: str = "minimize"
    workers: int = 1
    threads: int = 1
    pruner: dict[str, Any] | None = None
    seed: int = 0
    name: str = "sweep"
    trial_launcher: str = "process"
    nproc_per_node: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What must not change between the runs of one study (a resume with another space is another sweep)."""
        return json.dumps({"config": str(self.config), "overrides": self.overrides,
                           "space": {k: p.describe() for k, p in self.space.items()}, "sampler": self.sampler,
                           "metric": self.metric, "direction": self.direction, "seed": self.seed}, sort_keys=True)

    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.space.values())


@dataclass(kw_only=True)
class SweepFile:
    """The keys of a sweep spec file (the module docstring shows one)."""

    base: Recipe
    space: Annotated[Dict[str, Any], Accepts("dotted config keys, each with a list of choices or {low, high, log}",
                                             bool)]
    sampler: Literal[SAMPLERS] = "tpe"
    trials: Optional[PositiveInt] = None
    """Default: the grid's size for the grid sampler, else 10."""
    metric: Annotated[str, Accepts("a metrics.jsonl key such as eval_loss", bool)] = "eval_loss"
    direction: Literal[DIRECTIONS] = "minimize"
    workers: Optional[PositiveInt] = None
    """Default: the cores over the threads per trial."""
    threads: PositiveInt = 1
    pruner: Annotated[Union[None, Literal[False], Literal[PRUNERS], Dict[str, Any]],
                      Accepts(f"{' | '.join(PRUNERS)} (or a mapping with kind and the pruner's options)")] = None
    seed: int = 0
    name: Optional[NonEmptyStr] = None
    """Default: the spec file's stem."""
    trial_launcher: Literal[TRIAL_LAUNCHERS] = "process"
    nproc_per_node: PositiveInt = 1


@dataclass(kw_only=True)
class Range:
    """A space key's range: ints when both bounds are ints, log-uniform when log."""

    low: Number
    high: Number
    log: bool = False


Choices = Annotated[List[Scalar], Accepts("a non-empty list of choices", bool)]
SpaceValue = Annotated[Union[Choices, Range], Accepts("a list of choices or {low, high, log}")]


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every error is a MiniCPMError naming the file and key."""
    path = Path(path)
    spec = read_spec(path, SweepFile, what="sweep spec")

    def fail(key: str, message: str) -> MiniCPMError:
        return spec_error(path, key, message)

    config, overrides = resolve_recipe(spec.base, path)
    space = {key: _param(key, value, path) for key, value in spec.space.items()}
    if spec.sampler == "grid":
        for key, p in space.items():
            if p.choices is None:
                raise fail(f"space.{key}", "the grid sampler needs a list of choices, not a range")
        size = math.prod(len(p.choices) for p in space.values())
        trials = spec.trials or size
        if trials > size:
            raise fail("trials", f"{trials} is more than the grid's {size} points")
    else:
        trials = spec.trials or 10
    pruner = None if spec.pruner is False else spec.pruner
    if pruner is not None:
        pruner = {"kind": pruner} if isinstance(pruner, str) else dict(pruner)
        if pruner.get("kind") not in PRUNERS:
            raise fail("pruner.kind", f"expected {' | '.join(PRUNERS)}, got {pruner.get('kind')!r}")
        try:
            build_pruner(pruner)
        except TypeError as e:
            raise fail("pruner", f"bad option for {pruner['kind']} ({e})") from None
    if spec.nproc_per_node > 1 and spec.trial_launcher != "torchrun":
        raise fail("nproc_per_node", f"{spec.nproc_per_node} processes per trial need trial_launcher: torchrun")
    return SweepSpec(path=path, config=config, overrides=overrides, space=space, sampler=spec.sampler, trials=trials,
                     metric=spec.metric, direction=spec.direction,
                     workers=spec.workers or max(1, (os.cpu_count() or 1) // spec.threads), threads=spec.threads,
                     pruner=pruner, seed=spec.seed, name=spec.name or path.stem, trial_launcher=spec.trial_launcher,
                     nproc_per_node=spec.nproc_per_node)


def _param(key: str, value: Any, path: Path) -> Param:
    where = f"space.{key}"
    if not isinstance(key, str) or not all("." in k for k in key.split(TIE)):
        raise spec_error(path, where, "expected a dotted config key such as optim.lr")
    if TIE in key:
        return Param(key, choices=_tied_choices(key.split(TIE), value, where, path))
    value = typed(SpaceValue, value, where, path)
    if isinstance(value, list):
        return Param(key, choices=tuple(value))
    if value.low > value.high:
        raise spec_error(path, where, f"low {value.low} > high {value.high}")
    if value.log and value.low <= 0:
        raise spec_error(path, where, f"log scale needs low > 0, got {value.low}")
    return Param(key, low=value.low, high=value.high, log=value.log)


def _tied_choices(keys: list[str], value: Any, where: str, path: Path) -> tuple[str, ...]:
    """Keys joined by TIE take their values together, one list per choice (e.g. a batch size with the number of
    steps that keeps the tokens fixed); each choice is kept as its JSON text, a value Optuna can store."""
    if len(set(keys)) != len(keys):
        raise spec_error(path, where, "a key is named twice")
    choices = typed(Annotated[List[Any], Accepts(f"a non-empty list of choices, each a list of {len(keys)} values",
                                                 bool)], value, where, path)
    for i, choice in enumerate(choices):
        if not isinstance(choice, list) or len(choice) != len(keys):
            raise spec_error(path, where, f"choice {choice!r} is not a list of {len(keys)} values (one per key)")
        typed(List[Scalar], choice, f"{where}[{i}]", path)
    return tuple(json.dumps(choice) for choice in choices)


def require_optuna():
    """optuna, or one line saying how to install it (it is in the sweep extra)."""
    try:
        import optuna
    except ImportError:
        raise MiniCPMError("sweeps need Optuna: pip install 'minicpm[sweep]'") from None
    return optuna


def build_pruner(pruner: dict[str, Any] | None):
    optuna = require_optuna()

    if pruner is None:
        return optuna.pruners.NopPruner()
    options = {k: v for k, v in pruner.items() if k != "kind"}
    if pruner["kind"] == "median":
        return optuna.pruners.MedianPruner(**options)
    return optuna.pruners.HyperbandPruner(**options)


def overrides_for(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as training overrides (a tied key's value, its JSON list, gives one per key)."""
    out = []
    for key, value in params.items():
        if TIE in key:
            out += [f"{k}={override_value(v)}" for k, v in zip(key.split(TIE), json.loads(value))]
        else:
            out.append(f"{key}={override_value(value)}")
    return out
