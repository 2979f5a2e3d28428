"""Evaluators and their registry: what the training loop runs every run.eval_every steps and at the end.

The config's `evaluators:` list holds one mapping per evaluator, `{kind, name?, every?, ...options}`; `kind` picks a
registered class, `name` (default: the kind) prefixes its metrics as `eval/<name>/<metric>` in metrics.jsonl,
`every` overrides run.eval_every, and the rest are the kind's options (a dataclass, type-checked). An evaluator
may also publish some metrics under top-level aliases (the held-out loss writes eval_loss and eval_bpb, the keys
that sweeps, fits and reports read).

An evaluator works through an EvalTarget — in training the TrainModule — and never imports the training code:
`eval_step(batch, objective=...)` gives named (sum, count) pairs without gradients, `all_reduce` sums a tensor over
the processes. Register more with `@register_evaluator("kind", options=OptionsDataclass)`; run.plugins imports
modules that do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from minicpm.errors import MiniCPMError
from minicpm.registry import Registry

COMMON_KEYS = ("kind", "name", "every")


class EvalTarget(Protocol):
    """What an evaluator evaluates: a model with its precision and parallelism (the TrainModule in training)."""

    device: torch.device
    rank: int
    world_size: int
    model: torch.nn.Module

    def eval_step(self, batch: dict[str, torch.Tensor], objective: str | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Named (sum, count) over one batch under `objective` (default: the run's own), without gradients."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all processes (itself in a single process)."""


@dataclass(frozen=True)
class EvalSetup:
    """What evaluators are built from: the run's config and facts derived from it."""

    config: Any
    """The run's TrainConfig."""
    tokenizer_hash: str | None = None
    """Hash of the run's tokenizer (held-out shards are checked against it)."""


class Evaluator(Protocol):
    name: str
    every: int
    aliases: dict[str, str]
    """{metric: top-level key} also written with the metric's value."""

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        """{metric: value}; the loop writes them as eval/<name>/<metric>. {} when there is nothing to evaluate."""


EVALUATORS = Registry("evaluator", "evaluators[].kind", builtin=(
    "minicpm.eval.loss",  # heldout
    "minicpm.eval.task_runner",  # lm_eval (lm-eval itself loads when it runs)
    "minicpm.eval.passkey",  # passkey
    "minicpm.eval.position_loss",  # loss_by_position
    "minicpm.eval.answer_loss",  # answer_loss (SFT)
    "minicpm.eval.preference",  # preference (DPO's held-out accuracy)
))
register_evaluator = EVALUATORS.register
"""Class decorator: `@register_evaluator("kind", options=OptionsDataclass)` makes an evaluator buildable as
`{kind: <kind>, ...}` in the evaluators list; the class is built as `cls(name, every, options, setup)`."""


@dataclass(frozen=True)
class _Spec:
    kind: str
    name: str
    every: int | None
    options: Any


def _parse(specs: list[dict[str, Any]]) -> list[_Spec]:
    parsed, names, aliases = [], set(), set()
    for i, raw in enumerate(specs):
        where = f"evaluators[{i}]"
        if not isinstance(raw, dict) or "kind" not in raw:
            raise MiniCPMError(f"{where}: expected a mapping with a 'kind' (known: {', '.join(EVALUATORS.kinds())})")
        kind = raw["kind"]
        EVALUATORS.get(kind, f"{where}.kind")
        name, every = str(raw.get("name") or kind), raw.get("every")
        if name in names:
            raise MiniCPMError(f"{where}.name: {name!r} is used twice; give each evaluator its own name")
        if every is not None and (not isinstance(every, int) or every < 0):
            raise MiniCPMError(f"{where}.every must be an integer >= 0, got {every!r}")
        names.add(name)
        options = EVALUATORS.options(kind, {k: v for k, v in raw.items() if k not in COMMON_KEYS}, where)
        for alias in getattr(options, "aliases", lambda: {})().values():
            if alias in aliases:
                raise MiniCPMError(f"{where}: another evaluator already writes {alias}; set headline: false on one")
            aliases.add(alias)
        parsed.append(_Spec(kind, name, every, options))
    return parsed


def check_evaluator_specs(specs: list[dict[str, Any]]) -> None:
    """Validate the config's evaluators list (kinds registered, options well-typed, names unique)."""
    _parse(specs)


def build_evaluators(specs: list[dict[str, Any]], setup: EvalSetup) -> list[Evaluator]:
    every = setup.config.run.eval_every
    return [EVALUATORS.get(s.kind).cls(s.name, every if s.every is None else s.every, s.options, setup)
            for s in _parse(specs)]
