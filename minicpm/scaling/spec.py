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
    allow_different_data: false                 # compare-schedules: true lets the WSD arms decay on data.decay
                                                # while cosine and constant train on data.stable (an unfair test)
    decay: exp                                  # decay shape: exp | linear | cosine | 1-sqrt
    half_life: 0.2                              # exp decay half-life as a fraction of the decay (default 1/5)
    workers: 2                                  # runs trained at once, each in its own process (0: in this one)
    threads: 1                                  # torch threads per run
    launcher: local                             # how each run starts: local | torchrun | slurm (minicpm.jobs)
    nproc_per_node: 1                           # processes per run (torchrun, or torchrun inside each Slurm job)
    slurm: {partition: gpu, gpus: 1, time: 120, cpus: 8}   # launcher slurm: each run a Slurm job
    fit: {loss: loss, method: huber, law: shared, bootstrap: 200}   # campaign: loss or bpb, huber (log) or lsq
                                                # (raw; loss bpb + method lsq: the paper's §4.5 fit, shown beside
                                                # any other in the report), law: as `scaling fit --law`

N is the non-embedding parameter count (ModelConfig.non_embedding_params, as `minicpm scaling fit` reads runs).
Every error is one line naming the spec file and key; nothing is trained before the spec is valid.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from minicpm.errors import MiniCPMError
from minicpm.jobs.launchers import LAUNCHER_KEYS, LauncherConfig, launcher_config
from minicpm.laws import BOOTSTRAP_RESAMPLES
from minicpm.laws.variants import VARIANTS
from minicpm.model.config import PRESETS
from minicpm.model.shapes import FFN_RATIO, HEAD_DIM, SHAPE_FIELDS, WidthRule
from minicpm.optim.schedule import DECAYS
from minicpm.specs import (Accepts, Fraction, Number, PositiveFloat, PositiveInt, PositiveNumber, Recipe, at_least,
                           read_spec, resolve_recipe, spec_error, typed)

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
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """How each run starts (not part of the fingerprint: any launcher trains the same runs)."""
    # campaign
    decay_points: list[float] = field(default_factory=list)
    stable_until: float | None = None
    decay_fraction: float = 0.1
    fit_loss: str = "loss"
    fit_method: str = "huber"
    fit_law: str | None = None
    """The form of L(N, D) (laws/variants.py); None: the default for the method."""
    fit_bootstrap: int = BOOTSTRAP_RESAMPLES
    # compare-schedules
    tokens: list[float] = field(default_factory=list)
    decay_fractions: list[float] = field(default_factory=list)
    allow_different_data: bool = False
    """Whether the arms may train on different data (the WSD decays on data.decay); not part of the fingerprint: it
    permits a comparison, it changes no run."""

    def fingerprint(self) -> str:
        """What must not change between the runs of one campaign directory (its runs would not fit together)."""
        return json.dumps({"config": str(self.config), "overrides": self.overrides, "data": self.data,
                           "sizes": [[s.name, s.preset, s.shape] for s in self.sizes], "decay": self.decay,
                           "half_life": self.half_life, "decay_points": self.decay_points,
                           "stable_until": self.stable_until, "decay_fraction": self.decay_fraction,
                           "tokens": self.tokens, "decay_fractions": self.decay_fractions}, sort_keys=True)


# ------------------------------------------------------------------------------------------ the spec file

Multiple = Annotated[Number, Accepts("a positive multiple of N (tokens per parameter)", lambda x: x > 0)]
Multiples = Annotated[List[Multiple], Accepts("a non-empty list of multiples of N (tokens per parameter)", bool)]
Mixture = Annotated[Dict[str, Annotated[Number, Accepts("a positive weight", lambda x: x > 0)]],
                    Accepts("a mapping {DIR: weight}", bool)]
Preset = Annotated[str, Accepts(f"a model preset ({', '.join(PRESETS)})", lambda name: name in PRESETS)]
DirName = Annotated[str, Accepts("a directory name", lambda name: bool(name) and "/" not in name
                                 and not name.startswith("."))]
Resamples = at_least(10)


@dataclass(kw_only=True)
class ShapeSection:
    """shape: how a size given as width and depth is shaped (paper Table 8 by default)."""

    head_dim: PositiveInt = HEAD_DIM
    ffn_ratio: PositiveNumber = FFN_RATIO
    kv_heads: Optional[PositiveInt] = None
    """Key/value heads at every width (default: as many as the query heads)."""

    def rule(self) -> WidthRule:
        return WidthRule(head_dim=self.head_dim, ffn_ratio=self.ffn_ratio, kv_heads=self.kv_heads)


@dataclass(kw_only=True)
class SizeSection:
    """One of sizes: a width and a depth (and a run directory name, default w{width}-l{depth})."""

    width: PositiveInt
    depth: PositiveInt
    name: Optional[DirName] = None


@dataclass(kw_only=True)
class DataSection:
    """data: replaces these keys of the recipe's data section (paths relative to the working directory, as in a
    training recipe)."""

    stable: Mixture
    decay: Optional[Mixture] = None
    tokenizer: Optional[str] = None
    eval_sequences: Optional[int] = None


@dataclass(kw_only=True)
class FitSection:
    """fit: the law fitted on the campaign's table."""

    loss: Annotated[Literal[FIT_LOSSES], Accepts("loss (nats/token) | bpb (bits/byte)")] = "loss"
    method: Literal[FIT_METHODS] = "huber"
    law: Optional[Literal[tuple(VARIANTS)]] = None
    """The form of L(N, D), as `scaling fit --law` (default: shared for huber, the paper's own for lsq)."""
    bootstrap: Resamples = BOOTSTRAP_RESAMPLES


@dataclass(kw_only=True)
class ScalingFile:
    """The keys a campaign spec and a schedule-comparison spec share (the module docstring shows them)."""

    base: Recipe
    data: Optional[Dict[str, Any]] = None
    """Checked as a DataSection, kept as written: only the keys it gives replace the recipe's."""
    shape: Optional[ShapeSection] = None
    sizes: Annotated[List[Union[Preset, SizeSection]],
                     Accepts("a non-empty list of presets (proxy-9m) or {name, width, depth}", bool)]
    decay: Literal[DECAYS] = "exp"
    half_life: PositiveFloat = 0.2
    workers: at_least(0) = 1
    threads: PositiveInt = 1
    launcher: Any = None
    nproc_per_node: Any = None
    slurm: Any = None
    """launcher, nproc_per_node and slurm: checked by jobs.launchers.launcher_config (LAUNCHER_KEYS)."""


@dataclass(kw_only=True)
class CampaignFile(ScalingFile):
    decay_points: Multiples
    stable_until: Optional[Multiple] = None
    """Default: the last decay point."""
    decay_fraction: Fraction = 0.1
    fit: Optional[FitSection] = None


@dataclass(kw_only=True)
class SchedulesFile(ScalingFile):
    tokens: Multiples
    decay_fractions: Annotated[List[Fraction], Accepts("a non-empty list of fractions in (0, 1)", bool)] = field(
        default_factory=lambda: [0.1, 0.025])
    allow_different_data: bool = False
    """The arms must see the same data (one mixture throughout) unless this says otherwise."""


def load_campaign_spec(path: str | Path, kind: str = "campaign") -> CampaignSpec:
    """Read and check a campaign spec (kind="campaign") or a schedule-comparison spec (kind="schedules")."""
    path = Path(path)
    given = read_spec(path, CampaignFile if kind == "campaign" else SchedulesFile)

    def fail(key: str, message: str) -> MiniCPMError:
        return spec_error(path, key, message)

    if given.data is not None:
        typed(DataSection, given.data, "data", path)
    config, overrides = resolve_recipe(given.base, path)
    launcher = {key: getattr(given, key) for key in LAUNCHER_KEYS if getattr(given, key) is not None}
    spec = CampaignSpec(path=path, config=config, overrides=overrides,
                        sizes=_sizes(given.sizes, (given.shape or ShapeSection()).rule(), fail),
                        data=dict(given.data) if given.data is not None else None, decay=given.decay,
                        half_life=given.half_life, workers=given.workers, threads=given.threads,
                        launcher=launcher_config(launcher, fail))
    if kind == "campaign":
        spec.decay_points = _multiples(given.decay_points, "decay_points", fail)
        if len(spec.decay_points) < 2:
            raise fail("decay_points", f"one point per size ({spec.decay_points[0]:g}N) cannot separate the "
                                       f"data term from the model term: give at least 2")
        spec.stable_until = max(spec.decay_points) if given.stable_until is None else given.stable_until
        beyond = [p for p in spec.decay_points if p > spec.stable_until]
        if beyond:
            raise fail("decay_points", f"{beyond[0]:g}N lies beyond the stable run (stable_until "
                                       f"{spec.stable_until:g}N): a decay branches from a stable checkpoint")
        spec.decay_fraction = given.decay_fraction
        fit = given.fit or FitSection()
        spec.fit_loss, spec.fit_method, spec.fit_bootstrap = fit.loss, fit.method, fit.bootstrap
        spec.fit_law = fit.law
        if fit.law not in (None, "chinchilla") and fit.method == "lsq":
            raise fail("fit.law", f"the least-squares fit (the paper's curve_fit) fits the paper's law: use "
                                  f"law chinchilla or method huber, got {fit.law!r}")
    else:
        spec.tokens = _multiples(given.tokens, "tokens", fail)
        spec.decay_fractions = given.decay_fractions
        spec.allow_different_data = given.allow_different_data
    return spec


def _sizes(items: list, rule: WidthRule, fail) -> list[Size]:
    out: list[Size] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(Size(item, {k: getattr(PRESETS[item], k) for k in SHAPE_FIELDS}, preset=item))
            continue
        width, depth = item.width, item.depth
        if width % rule.head_dim:
            raise fail(f"sizes[{i}].width", f"{width} is not a multiple of shape.head_dim ({rule.head_dim})")
        heads, kv = rule.heads(width), rule.key_value_heads(width)
        if heads % kv:
            raise fail("shape.kv_heads", f"{kv} does not divide the {heads} heads of width {width}")
        out.append(Size(item.name or f"w{width}-l{depth}", rule.fields(width, depth)))
    names = [s.name for s in out]
    for name in names:
        if names.count(name) > 1:
            raise fail("sizes", f"the name {name!r} is used twice")
    return out


def _multiples(values: list, key: str, fail) -> list[float]:
    """Token counts in multiples of N: distinct, sorted."""
    out = sorted(float(v) for v in values)
    if len(set(out)) < len(out):
        raise fail(key, "a point is listed twice")
    return out
