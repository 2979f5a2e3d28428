"""Training objectives and their registry (DESIGN §1: between stages only the batch, the loss and the config
differ; the loop is one).

An objective turns a micro-batch into `(summed loss, named metrics)`: the loss summed over the targets it counts
(the train module divides by the count of the whole global batch, so accumulation and the number of processes do
not change the gradient), and metrics as `{name: (sum, count)}` that the train module sums over micro-batches and
processes and logs as sum/count. `count(batch)` says how many targets a batch has.

Auxiliary losses (an MoE's load balance, paper section 6) reach the objective through the model's one channel:
`model.hidden_states(..., aux_losses=dict)`, each a per-token mean over the micro-batch. `add_aux_losses` weighs each
by objective.aux_loss_weights and adds it × the micro-batch's target count, so that after the division by the
global count it is the token-weighted mean over the batch, whatever the accumulation and process count.
Keys "stat/<name>" in that dict are not losses but detached per-token statistics (such as an MoE layer's expert
load), logged as the metric <name> with no weight.

Register an objective with `@register_objective("name", options=OptionsDataclass)`; its class is built as
`cls(options, aux_loss_weights)`. run.plugins imports modules that register more.
"""

from __future__ import annotations

from typing import Protocol

import torch

from minicpm.data import IGNORE_INDEX
from minicpm.errors import MiniCPMError
from minicpm.registry import Registry
from minicpm.train.losses import lm_loss

Metric = tuple[torch.Tensor, torch.Tensor]
"""(sum, count) of a named metric over a micro-batch."""
STAT_PREFIX = "stat/"
"""Keys of the aux-loss channel that are a logged statistic, not a loss."""


class Objective(Protocol):
    needs_reference: bool
    """Whether the train module must hold a frozen reference model (DPO's) and pass it as `reference`."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Targets the loss sums over in a batch; the step's loss is normalised by the global batch's count."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int | None = None,
             reference: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, Metric]]:
        """The summed loss of a micro-batch and its named metrics."""


OBJECTIVES = Registry("objective", "objective.kind", builtin=("minicpm.train.dpo",))
register_objective = OBJECTIVES.register
"""Class decorator: `@register_objective("kind", options=OptionsDataclass)` makes an objective buildable as
`objective.kind: <kind>`, its options filled from objective.options."""


def check_objective(cfg) -> None:
    """Validate an ObjectiveConfig (kind registered, options of the right keys and types) without building it."""
    OBJECTIVES.options(cfg.kind, dict(cfg.options), "objective.options")


def build_objective(cfg) -> Objective:
    """The objective an ObjectiveConfig describes."""
    options = OBJECTIVES.options(cfg.kind, dict(cfg.options), "objective.options")
    return OBJECTIVES.get(cfg.kind).cls(options, dict(cfg.aux_loss_weights))


def add_aux_losses(loss: torch.Tensor, metrics: dict[str, Metric], aux_losses: dict[str, torch.Tensor],
                   weights: dict[str, float], targets: int) -> torch.Tensor:
    """loss + Σ weight·aux·targets over the auxiliary losses the model reported; each is logged as aux/<name>, and
    each "stat/<name>" as the metric <name>."""
    n = torch.tensor(float(targets), device=loss.device)
    for name, value in aux_losses.items():
        if name.startswith(STAT_PREFIX):
            metrics[name[len(STAT_PREFIX):]] = (value.detach().float() * n, n)
            continue
        if name not in weights:
            raise MiniCPMError(f"the model reports an auxiliary loss {name!r}, but objective.aux_loss_weights has no "
                               f"weight for it (has: {', '.join(weights) or 'none'})")
        loss = loss + weights[name] * value.float() * n
        metrics[f"aux/{name}"] = (value.detach().float() * n, n)
    return loss


def count_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


@register_objective("next_token")
class NextToken:
    """Cross-entropy of each next token whose label is not IGNORE_INDEX (pretraining and the decay stage)."""

    needs_reference = False

    def __init__(self, options: None = None, aux_loss_weights: dict[str, float] | None = None):
        self.aux_loss_weights = dict(aux_loss_weights or {})

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_labels(batch)

    def loss(self, model, batch, *, chunk_size=None, reference=None):
        # auxiliary losses only in training: a held-out loss is the cross-entropy alone
        aux: dict[str, torch.Tensor] | None = {} if model.training else None
        # packed documents (data.packing: document) attend only to themselves
        hidden = model.hidden_states(batch["input_ids"], aux_losses=aux, doc_ids=batch.get("doc_ids"))
        loss = lm_loss(hidden, model.head_weight, batch["labels"], chunk_size=chunk_size)
        metrics: dict[str, Metric] = {}
        if aux:
            loss = add_aux_losses(loss, metrics, aux, self.aux_loss_weights, self.count(batch))
        return loss, metrics



@register_objective("sft")
class SupervisedFineTuning(NextToken):
    """Cross-entropy of the assistants' answer tokens only, token-weighted as next_token (paper section 5: SFT).

    Which tokens are answers comes with the data: chat shards (`minicpm prepare --format chat`) carry a loss mask,
    and the batch's labels are IGNORE_INDEX everywhere else. Run it with data.packing: document, so that packed
    conversations do not see each other (configs/sft.yaml)."""
