"""The spec of a WSD scaling campaign (`minicpm scaling campaign`) and of a schedule comparison
(`minicpm scaling compare-schedules`): which model sizes, how many tokens, which decays, and the training recipe.

    base: {config: recipe.yaml, overrides: [optim.lr=0.01]}  # data, batch, optimizer, warmup; relative to SPEC
    data: {stable: {data/web: 1.0}, decay: {data/web: 0.7, data/hq: 0.3}, tokenizer: data/tokenizer.json}
    shape: {head_dim: 64, ffn_ratio: 2.5}       # the rule of paper Table 8 for sizes given as width/depth
    sizes:                                      # a preset name, or {name, width, depth}
      - proxy-9m
      - {name: w384, width: 384, depth: 9}
    decay_points: [10, 20, 30, 40, 50, 60]      # campaign: decays branch at these multiples of N tokens (paper 10N..60N)
    stable_until: 60                            # campaign: the stable run's length in N (default: the last point)
    decay_fraction: 0.1                         # campaign: decay tokens = this x the tokens at the branch point
    tokens: [20, 40]                            # compare-schedules: run lengths D in multiples of N
    decay_fractions: [0.1, 0.025]               # compare-schedules: the WSD decays compared (paper Fig. 5/6)
    decay: exp                                  # decay shape: exp | linear | cosine | 1-sqrt
    half_life: 0.2                              # exp decay half-life as a fraction of the decay (default 1/5)
    workers: 2                                  # runs trained at once, each in its own process (0: in this one)
    threads: 1                                  # torch threads per run
    fit: {loss: loss, method: huber, bootstrap: 200}   # campaign: fit loss or bpb, by huber (log) or lsq (raw)

N is the non-embedding parameter count (ModelConfig.non_embedding_params, as `minicpm scaling fit` reads runs).
Every error is one line naming the spec file and key; nothing is trained before the spec is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.sweep.spec import _base
from minicpm.optim.schedule import DECAYS

COMMON_KEYS = ("base", "data", "shape", "sizes", "decay", "half_life", "workers", "threads")
CAMPAIGN_KEYS = COMMON_KEYS + ("decay_points", "stable_until", "decay_fraction", "fit")
SCHEDULES_KEYS = COMMON_KEYS + ("tokens", "decay_fractions")
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
FIT_LOSSES = ("loss", "bpb")
FIT_METHODS = ("huber", "lsq")


@dataclass(frozen=True)
class Size:
    """One model size: its name (a run directory name) and the model.* overrides that make it."""

    name: str
    shape: dict[str, Any]
    preset: str | None = None

    def overrides(self) -> list[str]:
        out = [f"model.preset={self.preset}"] if self.preset else []
        return out + [f"model.{k}={v}" for k, v in self.shape.items()]

    def non_embedding_params(self) -> int:
        from minicpm.model.config import ModelConfig, preset

        base = preset(self.preset) if self.preset else ModelConfig()
        return dataclasses.replace(base, **self.shape).non_embedding_params()


@dataclass
class CampaignSpec:
    path: Path
    config: Path
    overrides: list[str]
    sizes: list[Size]
    data: dict[str, Any] | None = None
    decay: str = "exp"
    half_life: float = 0.2
    workers: int = 1
    threads: int = 1
    # campaign
    decay_points: list[float] = field(default_factory=list)
    stable_until: float | None = None
    decay_fraction: float = 0.1
    fit_loss: str = "loss"
    fit_method: str = "huber"
    fit_bootstrap: int = 200
    # compare-schedules
    tokens: list[float] = field(default_factory=list)
    decay_fractions: list[float] = field(default_factory=list)

    def fingerprint(self) -> str:
        """What must not change between the runs of one campaign directory (its runs would not fit together)."""
        return json.dumps({"config": str(self.config), "overrides": self.overrides, "data": self.data,
                           "sizes": [[s.name, s.preset, s.shape] for s in self.sizes], "decay": self.decay,
                           "half_life": self.half_life, "decay_points": self.decay_points,
                           "stable_until": self.stable_until, "decay_fraction": self.decay_fraction,
                           "tokens": self.tokens, "decay_fractions": self.decay_fractions}, sort_keys=True)


def load_campaign_spec(path: str | Path, kind: str = "campaign") -> CampaignSpec:
    """Read and check a campaign spec (kind="campaign") or a schedule-comparison spec (kind="schedules")."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such spec")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MiniCPMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MiniCPMError(f"{path}: expected a mapping with base, sizes, ...")

    def fail(key: str, message: str) -> MiniCPMError:
        return MiniCPMError(f"{path}: {key}: {message}")

    allowed = CAMPAIGN_KEYS if kind == "campaign" else SCHEDULES_KEYS
    for key in data:
        if key not in allowed:
            raise fail(str(key), f"unknown key (expected one of {', '.join(allowed)})")
    config, overrides = _base(data.get("base"), path, fail)
    spec = CampaignSpec(path=path, config=config, overrides=overrides,
                        sizes=_sizes(data.get("sizes"), _shape_rule(data.get("shape"), fail), fail),
                        data=_data(data.get("data"), fail))
    spec.decay = data.get("decay", "exp")
    if spec.decay not in DECAYS:
        raise fail("decay", f"expected one of {', '.join(DECAYS)}, got {spec.decay!r}")
    spec.half_life = _fraction(data.get("half_life", 0.2), "half_life", fail, high=None)
    spec.workers = _count(data.get("workers", 1), "workers", fail, low=0)
    spec.threads = _count(data.get("threads", 1), "threads", fail, low=1)
    if kind == "campaign":
        spec.decay_points = _multiples(data.get("decay_points"), "decay_points", fail)
        if len(spec.decay_points) < 2:
            raise fail("decay_points", f"one point per size ({spec.decay_points[0]:g}N) cannot separate the "
                                       f"data term from the model term: give at least 2")
        spec.stable_until = data.get("stable_until", max(spec.decay_points))
        if not _positive_number(spec.stable_until):
            raise fail("stable_until", f"expected a positive multiple of N, got {spec.stable_until!r}")
        beyond = [p for p in spec.decay_points if p > spec.stable_until]
        if beyond:
            raise fail("decay_points", f"{beyond[0]:g}N lies beyond the stable run (stable_until "
                                       f"{spec.stable_until:g}N): a decay branches from a stable checkpoint")
        spec.decay_fraction = _fraction(data.get("decay_fraction", 0.1), "decay_fraction", fail)
        _fit(spec, data.get("fit"), fail)
    else:
        spec.tokens = _multiples(data.get("tokens"), "tokens", fail)
        spec.decay_fractions = [_fraction(f, "decay_fractions", fail)
                                for f in _list(data.get("decay_fractions", [0.1, 0.025]), "decay_fractions", fail)]
    return spec


def _shape_rule(shape: Any, fail) -> dict[str, float]:
    rule = {"head_dim": 64, "ffn_ratio": 2.5, "kv_heads": None}
    if shape is None:
        return rule
    if not isinstance(shape, dict):
        raise fail("shape", "expected {head_dim, ffn_ratio, kv_heads}")
    for key, value in shape.items():
        if key not in rule:
            raise fail(f"shape.{key}", "unknown key (expected head_dim, ffn_ratio, kv_heads)")
        if not _positive_number(value):
            raise fail(f"shape.{key}", f"expected a positive number, got {value!r}")
        rule[key] = value
    return rule


def _sizes(sizes: Any, rule: dict, fail) -> list[Size]:
    from minicpm.model.config import PRESETS

    if not isinstance(sizes, list) or not sizes:
        raise fail("sizes", "missing or empty: give presets (proxy-9m) or {name, width, depth}")
    out: list[Size] = []
    for i, item in enumerate(sizes):
        where = f"sizes[{i}]"
        if isinstance(item, str):
            if item not in PRESETS:
                raise fail(where, f"unknown preset {item!r} (choose one of {', '.join(PRESETS)})")
            p = PRESETS[item]
            out.append(Size(item, {k: getattr(p, k) for k in SHAPE_FIELDS}, preset=item))
            continue
        if not isinstance(item, dict):
            raise fail(where, f"expected a preset name or {{name, width, depth}}, got {item!r}")
        unknown = set(item) - {"name", "width", "depth"}
        if unknown:
            raise fail(f"{where}.{sorted(unknown)[0]}", "unknown key (expected name, width, depth)")
        width, depth = item.get("width"), item.get("depth")
        for key, value in (("width", width), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise fail(f"{where}.{key}", f"expected a positive integer, got {value!r}")
        head_dim = int(rule["head_dim"])
        if width % head_dim:
            raise fail(f"{where}.width", f"{width} is not a multiple of shape.head_dim ({head_dim})")
        heads = width // head_dim
        kv = int(rule["kv_heads"] or heads)
        if heads % kv:
            raise fail("shape.kv_heads", f"{kv} does not divide the {heads} heads of width {width}")
        name = item.get("name", f"w{width}-l{depth}")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise fail(f"{where}.name", f"expected a directory name, got {name!r}")
        out.append(Size(name, {"hidden_size": width, "intermediate_size": int(round(width * rule["ffn_ratio"])),
                               "num_hidden_layers": depth, "num_attention_heads": heads,
                               "num_key_value_heads": kv}))
    names = [s.name for s in out]
    for name in names:
        if names.count(name) > 1:
            raise fail("sizes", f"the name {name!r} is used twice")
    return out


def _data(data: Any, fail) -> dict[str, Any] | None:
    """The recipe's data section replaced: stable and decay mixtures (paths relative to the working directory, as
    in a training recipe) and the tokenizer."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise fail("data", "expected {stable: {DIR: weight}, decay: {...}, tokenizer: FILE}")
    for key in data:
        if key not in ("stable", "decay", "tokenizer", "eval_sequences"):
            raise fail(f"data.{key}", "unknown key (expected stable, decay, tokenizer, eval_sequences)")
    for key in ("stable", "decay"):
        mix = data.get(key)
        if mix is None and key == "decay":
            continue
        if not isinstance(mix, dict) or not mix:
            raise fail(f"data.{key}", "expected a mapping {DIR: weight}")
        for directory, weight in mix.items():
            if not _positive_number(weight):
                raise fail(f"data.{key}.{directory}", f"expected a positive weight, got {weight!r}")
    return dict(data)


def _fit(spec: CampaignSpec, fit: Any, fail) -> None:
    if fit is None:
        return
    if not isinstance(fit, dict):
        raise fail("fit", "expected {loss: loss|bpb, method: huber|lsq, bootstrap: N}")
    for key in fit:
        if key not in ("loss", "method", "bootstrap"):
            raise fail(f"fit.{key}", "unknown key (expected loss, method, bootstrap)")
    spec.fit_loss = fit.get("loss", "loss")
    if spec.fit_loss not in FIT_LOSSES:
        raise fail("fit.loss", f"expected loss (nats/token) or bpb (bits/byte), got {spec.fit_loss!r}")
    spec.fit_method = fit.get("method", "huber")
    if spec.fit_method not in FIT_METHODS:
        raise fail("fit.method", f"expected huber or lsq, got {spec.fit_method!r}")
    spec.fit_bootstrap = _count(fit.get("bootstrap", 200), "fit.bootstrap", fail, low=10)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _list(value: Any, key: str, fail) -> list:
    if not isinstance(value, list) or not value:
        raise fail(key, f"expected a non-empty list, got {value!r}")
    return value


def _multiples(value: Any, key: str, fail) -> list[float]:
    """Token counts in multiples of N: positive, distinct, sorted."""
    out = []
    for v in _list(value, key, fail):
        if not _positive_number(v):
            raise fail(key, f"expected positive multiples of N (tokens per parameter), got {v!r}")
        out.append(float(v))
    if len(set(out)) < len(out):
        raise fail(key, "a point is listed twice")
    return sorted(out)


def _fraction(value: Any, key: str, fail, high: float | None = 1.0) -> float:
    if not _positive_number(value) or (high is not None and value >= high):
        raise fail(key, f"expected a fraction in (0, {high:g}), got {value!r}" if high else
                   f"expected a positive number, got {value!r}")
    return float(value)


def _count(value: Any, key: str, fail, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise fail(key, f"expected an integer >= {low}, got {value!r}")
    return value
