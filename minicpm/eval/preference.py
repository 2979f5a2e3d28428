"""Held-out preference accuracy: the evaluator of kind `preference`.

On a prepared pairs directory's held-out split it reports, as eval/<name>/<metric>:
  accuracy         share of pairs whose chosen answer the model finds likelier than the rejected one (summed
                   answer log-probs): needs no reference, so it means the same before and after DPO
  accuracy_per_token   the same with mean log-probs per answer token (a longer answer is not disfavoured for its
                   length alone)
  logps/chosen, logps/rejected   mean summed answer log-probs
and, when the run has a reference (a DPO run, frozen or cached), the implicit reward's
  reward_accuracy  share of pairs with β·r_c > β·r_r (TRL's rewards/accuracies)
  margin           mean β·(r_c − r_r)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minicpm.errors import MiniCPMError
from minicpm.eval.evaluators import EvalSetup, EvalTarget, register_evaluator

RENAMED = {"rewards/accuracy": "reward_accuracy", "rewards/margins": "margin", "accuracy/per_token": "accuracy_per_token"}
REPORTED = ("accuracy", "logps/chosen", "logps/rejected", *RENAMED)


@dataclass
class PreferenceOptions:
    """Options of the preference-accuracy evaluator."""

    data: Optional[str] = None
    """A prepared pairs directory (minicpm dpo prepare); null: the run's own (its one data.stable entry)."""
    split: str = "val"
    """The split evaluated: val (held out) or train."""
    pairs: Optional[int] = None
    """Evaluate at most the first this many pairs; null: all of the split."""
    batch_size: Optional[int] = None
    """Pairs per forward pass; null: batch.micro_batch_size."""


@register_evaluator("preference", options=PreferenceOptions)
class PreferenceAccuracy:
    """Preference accuracy (and, with a reference, reward accuracy and margin) on held-out pairs; under several
    processes each takes an equal slice of the pairs and the sums are all-reduced."""

    def __init__(self, name: str, every: int, options: PreferenceOptions, setup: EvalSetup):
        from minicpm.data.pairs import PreparedPairs

        cfg = setup.config
        self.name, self.every, self.options, self.aliases = name, every, options, {}
        directory = options.data
        if directory is None:
            if len(cfg.data.stable) != 1:
                raise MiniCPMError(f"evaluator {name}: set data: to a prepared pairs directory (the run's "
                                   f"data.stable has {len(cfg.data.stable)} entries)")
            directory = next(iter(cfg.data.stable))
        if options.split not in ("val", "train"):
            raise MiniCPMError(f"evaluator {name}: split must be val or train, got {options.split!r}")
        self.prepared = PreparedPairs(directory)
        self.pairs = self.prepared.splits[options.split][:options.pairs]
        self.batch_size = options.batch_size or cfg.batch.micro_batch_size
        # the run's own objective when it is DPO (its reference comes along); else DPO's, measuring the model alone
        self.objective = None if cfg.objective.kind == "dpo" else "dpo"
        self.reference = self._cached_reference(cfg, directory)

    def _cached_reference(self, cfg, directory) -> dict[str, torch.Tensor] | None:
        options = cfg.objective.options or {}
        if cfg.objective.kind != "dpo" or options.get("reference", "cached") != "cached" or not self.pairs:
            return None
        from minicpm.data.pairs import read_reference, reference_fingerprint

        fingerprint = reference_fingerprint(cfg.run.init_weights_from, cfg.run.dtype)
        return read_reference(directory, fingerprint, self.options.split,
                              how=f"minicpm dpo precompute-ref {cfg.run.init_weights_from} --data {directory}")

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        return preference_metrics(target, self.pairs, self.prepared.pad_to, self.prepared.pad_id,
                                  batch_size=self.batch_size, objective=self.objective, reference=self.reference)


@torch.no_grad()
def preference_metrics(target: EvalTarget, pairs, pad_to: int, pad_id: int, *, batch_size: int,
                       objective: str | None = "dpo", reference: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, float]:
    """The metrics of the module docstring over `pairs`, summed over every process's equal slice."""
    from minicpm.data.pairs import pair_rows

    per_rank = len(pairs) // target.world_size
    first = target.rank * per_rank
    sums: dict[str, list[float]] = {}
    for start in range(first, first + per_rank, batch_size):
        stop = min(start + batch_size, first + per_rank)
        batch = pair_rows(pairs[start:stop], pad_to, pad_id)
        if reference is not None:
            batch["ref_chosen_logps"] = reference["chosen"][start:stop]
            batch["ref_rejected_logps"] = reference["rejected"][start:stop]
        for key, (value, count) in target.eval_step(batch, objective).items():
            if key in REPORTED:
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(value)
                acc[1] += float(count)
    names = [k for k in REPORTED if k in sums]
    packed = torch.tensor([x for k in names for x in sums[k]], dtype=torch.float64, device=target.device)
    packed = target.all_reduce(packed).tolist()
    return {RENAMED.get(k, k): packed[2 * i] / packed[2 * i + 1] for i, k in enumerate(names) if packed[2 * i + 1]}
