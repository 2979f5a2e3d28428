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
from typing import Any

from minicpm.errors import MiniCPMError

SAMPLERS = ("grid", "random", "tpe")
DIRECTIONS = ("minimize", "maximize")
PRUNERS = ("median", "hyperband")
SPEC_KEYS = ("base", "space", "sampler", "trials", "metric", "direction", "workers", "threads", "pruner", "seed",
             "name", "trial_launcher", "nproc_per_node")
TRIAL_LAUNCHERS = ("process", "torchrun")
BASE_KEYS = ("config", "overrides")
TIE = "+"
"""Joins space keys whose values are chosen together."""
RANGE_KEYS = ("low", "high", "log")


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


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every error is a MiniCPMError naming the file and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such sweep spec")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MiniCPMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MiniCPMError(f"{path}: expected a mapping with base, space, sampler, trials, ...")

    def fail(key: str, message: str) -> MiniCPMError:
        return MiniCPMError(f"{path}: {key}: {message}")

    for key in data:
        if key not in SPEC_KEYS:
            raise fail(str(key), f"unknown key (expected one of {', '.join(SPEC_KEYS)})")
    config, overrides = _base(data.get("base"), path, fail)
    space = _space(data.get("space"), fail)

    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise fail("sampler", f"unknown sampler {sampler!r} (expected {' | '.join(SAMPLERS)})")
    direction = data.get("direction", "minimize")
    if direction not in DIRECTIONS:
        raise fail("direction", f"expected minimize or maximize, got {direction!r}")
    metric = data.get("metric", "eval_loss")
    if not isinstance(metric, str) or not metric:
        raise fail("metric", f"expected a metrics.jsonl key such as eval_loss, got {metric!r}")
    threads = _positive_int(data.get("threads", 1), "threads", fail)
    workers = _positive_int(data.get("workers", max(1, (os.cpu_count() or 1) // threads)), "workers", fail)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise fail("seed", f"expected an integer, got {seed!r}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise fail("name", f"expected a non-empty string, got {name!r}")

    if sampler == "grid":
        for key, p in space.items():
            if p.choices is None:
                raise fail(f"space.{key}", "the grid sampler needs a list of choices, not a range")
        size = math.prod(len(p.choices) for p in space.values())
        trials = _positive_int(data.get("trials", size), "trials", fail)
        if trials > size:
            raise fail("trials", f"{trials} is more than the grid's {size} points")
    else:
        trials = _positive_int(data.get("trials", 10), "trials", fail)
    pruner = _pruner(data.get("pruner"), fail)
    launcher = data.get("trial_launcher", "process")
    if launcher not in TRIAL_LAUNCHERS:
        raise fail("trial_launcher", f"expected {' | '.join(TRIAL_LAUNCHERS)}, got {launcher!r}")
    nproc = _positive_int(data.get("nproc_per_node", 1), "nproc_per_node", fail)
    if nproc > 1 and launcher != "torchrun":
        raise fail("nproc_per_node", f"{nproc} processes per trial need trial_launcher: torchrun")
    return SweepSpec(path=path, config=config, overrides=overrides, space=space, sampler=sampler, trials=trials,
                     metric=metric, direction=direction, workers=workers, threads=threads, pruner=pruner, seed=seed,
                     name=name, trial_launcher=launcher, nproc_per_node=nproc)


def _base(base: Any, path: Path, fail) -> tuple[Path, list[str]]:
    if base is None:
        raise fail("base", "missing (give base: {config: RECIPE.yaml, overrides: [key=value, ...]})")
    if isinstance(base, str):
        base = {"config": base}
    if not isinstance(base, dict):
        raise fail("base", "expected a mapping with config and overrides")
    for key in base:
        if key not in BASE_KEYS:
            raise fail(f"base.{key}", "unknown key (expected config, overrides)")
    config = base.get("config")
    if not isinstance(config, str) or not config:
        raise fail("base.config", "expected the path of a training recipe (YAML)")
    config_path = Path(config) if Path(config).is_absolute() else (path.parent / config)
    if not config_path.is_file():
        raise fail("base.config", f"{config_path}: no such file")
    overrides = base.get("overrides", []) or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={_override_value(v)}" for k, v in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise fail("base.overrides", "expected a list of key=value strings (or a mapping of key: value)")
    return config_path.resolve(), list(overrides)


def _space(space: Any, fail) -> dict[str, Param]:
    if not isinstance(space, dict) or not space:
        raise fail("space", "empty: give at least one dotted config key with choices or {low, high}")
    out = {}
    for key, value in space.items():
        where = f"space.{key}"
        if not isinstance(key, str) or not all("." in k for k in key.split(TIE)):
            raise fail(where, "expected a dotted config key such as optim.lr")
        if TIE in key:
            out[key] = Param(key, choices=_tied_choices(key.split(TIE), value, where, fail))
        elif isinstance(value, list):
            if not value:
                raise fail(where, "empty list of choices")
            for choice in value:
                if not _is_scalar(choice):
                    raise fail(where, f"choice {choice!r} is not a number, string, boolean or null")
            out[key] = Param(key, choices=tuple(value))
        elif isinstance(value, dict):
            for k in value:
                if k not in RANGE_KEYS:
                    raise fail(f"{where}.{k}", "unknown key (expected low, high, log)")
            low, high, log = value.get("low"), value.get("high"), value.get("log", False)
            for name, bound in (("low", low), ("high", high)):
                if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
                    raise fail(f"{where}.{name}", f"expected a number, got {bound!r}")
            if not isinstance(log, bool):
                raise fail(f"{where}.log", f"expected true or false, got {log!r}")
            if low > high:
                raise fail(where, f"low {low} > high {high}")
            if log and low <= 0:
                raise fail(where, f"log scale needs low > 0, got {low}")
            out[key] = Param(key, low=low, high=high, log=log)
        else:
            raise fail(where, "expected a list of choices or {low, high, log}")
    return out


def _is_scalar(value: Any) -> bool:
    """A value one override can carry (and Optuna can store)."""
    return value is None or isinstance(value, (int, float, str, bool))


def _tied_choices(keys: list[str], value: Any, where: str, fail) -> tuple[str, ...]:
    """Keys joined by TIE take their values together, one list per choice (e.g. a batch size with the number of
    steps that keeps the tokens fixed); each choice is kept as its JSON text, a value Optuna can store."""
    if len(set(keys)) != len(keys):
        raise fail(where, "a key is named twice")
    if not isinstance(value, list) or not value:
        raise fail(where, f"expected a non-empty list of choices, each a list of {len(keys)} values")
    for choice in value:
        if not isinstance(choice, list) or len(choice) != len(keys):
            raise fail(where, f"choice {choice!r} is not a list of {len(keys)} values (one per key)")
        for item in choice:
            if not _is_scalar(item):
                raise fail(where, f"choice {choice!r}: {item!r} is not a number, string, boolean or null")
    return tuple(json.dumps(choice) for choice in value)


def _pruner(pruner: Any, fail) -> dict[str, Any] | None:
    if pruner is None or pruner is False:
        return None
    if isinstance(pruner, str):
        pruner = {"kind": pruner}
    if not isinstance(pruner, dict) or pruner.get("kind") not in PRUNERS:
        raise fail("pruner", f"expected {' | '.join(PRUNERS)} (or a mapping with kind), got {pruner!r}")
    options = {k: v for k, v in pruner.items() if k != "kind"}
    try:
        build_pruner({"kind": pruner["kind"], **options})
    except TypeError as e:
        raise fail("pruner", f"bad option for {pruner['kind']} ({e})") from None
    return dict(pruner)


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


def _positive_int(value: Any, key: str, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise fail(key, f"expected a positive integer, got {value!r}")
    return value


def _override_value(value: Any) -> str:
    """A value as the right-hand side of a key=value override (OmegaConf dotlist syntax)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def overrides_for(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as training overrides (a tied key's value, its JSON list, gives one per key)."""
    out = []
    for key, value in params.items():
        if TIE in key:
            out += [f"{k}={_override_value(v)}" for k, v in zip(key.split(TIE), json.loads(value))]
        else:
            out.append(f"{key}={_override_value(value)}")
    return out
