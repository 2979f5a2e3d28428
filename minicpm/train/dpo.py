"""Direct preference optimisation: the `dpo` objective and the reference log-probs computed once.

Per pair, with the answers' summed log-probs under the policy (π) and the reference (ref) — TRL's semantics, the
completion tokens only (research/family.md §3):
  r_c = log π(chosen) − log ref(chosen),  r_r = log π(rejected) − log ref(rejected)
  sigmoid (Rafailov et al. 2023):  −log σ(β·(r_c − r_r))
  ipo (Azar et al. 2023):          (r_c/|chosen| − r_r/|rejected| − 1/(2β))²   (log-ratios per answer token)
  + nll_weight × the chosen answer's mean token NLL (RPO, Pang et al. 2024), when nll_weight > 0.
The objective sums these over a micro-batch and counts pairs, so the train module's step loss is the mean over the
global batch's pairs whatever the accumulation. Metrics, each a mean over pairs: rewards/chosen = β·r_c,
rewards/rejected = β·r_r, rewards/margins, rewards/accuracy (share with β·r_c > β·r_r, TRL's), logps/chosen,
logps/rejected, and accuracy: the share of pairs whose chosen answer the policy itself finds likelier (no reference
needed: what the preference evaluator reports before and after DPO), also per answer token (accuracy/per_token:
mean token log-probs compared, so that a longer answer is not disfavoured for its length alone).

The reference is either the frozen model the train module holds beside the policy (options.reference: frozen) or
its log-probs computed once by `precompute_reference` and stored next to the data (options.reference: cached), so
that only the policy needs memory and each step saves the reference forward. Both run the same function on rows of
the same padded length, so they agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm.data import IGNORE_INDEX
from minicpm.errors import MiniCPMError
from minicpm.train.objectives import Metric, add_aux_losses, register_objective

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("frozen", "cached")
PRECOMPUTE_HOW = "minicpm dpo precompute-ref CKPT --data DIR"


@dataclass
class DPOOptions:
    """objective.options of kind dpo."""

    loss: str = "sigmoid"
    """sigmoid (DPO) | ipo."""
    beta: float = 0.1
    """β: the strength of the pull towards the reference (the paper does not state it; TRL's and MiniCPM's DPO
    example use 0.1)."""
    nll_weight: float = 0.0
    """Weight of an NLL term on the chosen answer (RPO); 0 disables it."""
    reference: str = "cached"
    """cached: the reference's log-probs computed once next to the data (`minicpm dpo precompute-ref`), only the
    policy in memory; frozen: the reference model (run.init_weights_from) held frozen beside the policy."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise MiniCPMError(f"objective.options.loss: expected {' or '.join(LOSSES)}, got {self.loss!r}")
        if not self.beta > 0:
            raise MiniCPMError(f"objective.options.beta must be positive, got {self.beta}")
        if not self.nll_weight >= 0:
            raise MiniCPMError(f"objective.options.nll_weight must be >= 0, got {self.nll_weight}")
        if self.reference not in REFERENCES:
            raise MiniCPMError(f"objective.options.reference: expected frozen or cached, got {self.reference!r}")


def answer_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                 aux_losses: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its answer tokens (labels != IGNORE_INDEX) and their count. The head runs on
    the answer positions only: the logits of prompt and padding are never made."""
    hidden = model.hidden_states(input_ids, aux_losses=aux_losses)
    mask = labels != IGNORE_INDEX
    logits = F.linear(hidden[mask], model.head_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, as the forward's
    token_logps = -F.cross_entropy(logits, labels[mask], reduction="none")
    # scattered back into rows and summed in order: deterministic on every device (no atomic index_add)
    per_row = torch.zeros(labels.shape, dtype=token_logps.dtype, device=labels.device)
    return per_row.masked_scatter(mask, token_logps).sum(dim=1), mask.sum(dim=1)


def preference_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
                      loss: str, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, β·r_c, β·r_r) from summed answer log-probs (see the module docstring)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        per_token = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (per_token - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def concatenated(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows: one forward pass for both (TRL's concatenated forward)."""
    return (torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
            torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))


@torch.no_grad()
def reference_logps(reference: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (chosen, rejected) summed answer log-probs of a batch of pairs."""
    ids, labels = concatenated(batch)
    logps, _ = answer_logps(reference, ids, labels)
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:]


@register_objective("dpo", options=DPOOptions)
class DPO:
    """Preference optimisation over pairs (minicpm.data.pairs batches)."""

    def __init__(self, options: DPOOptions | None = None, aux_loss_weights: dict[str, float] | None = None):
        self.options = options or DPOOptions()
        self.aux_loss_weights = dict(aux_loss_weights or {})
        self.needs_reference = self.options.reference == "frozen"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def loss(self, model, batch, *, chunk_size=None, reference=None):
        o = self.options
        n = self.count(batch)
        aux: dict[str, torch.Tensor] | None = {} if model.training else None
        ids, labels = concatenated(batch)
        logps, tokens = answer_logps(model, ids, labels, aux_losses=aux)
        chosen, rejected = logps[:n], logps[n:]
        pairs = torch.tensor(float(n), device=logps.device)
        metrics: dict[str, Metric] = {
            "logps/chosen": (chosen.detach().sum(), pairs), "logps/rejected": (rejected.detach().sum(), pairs),
            "accuracy": ((chosen > rejected).float().sum(), pairs),
            "accuracy/per_token": ((chosen / tokens[:n] > rejected / tokens[n:]).float().sum(), pairs)}
        ref = self._reference(batch, reference)
        if ref is None:
            if model.training:
                raise MiniCPMError("objective dpo: no reference log-probs (objective.options.reference cached needs "
                                   "the batches' ref_chosen_logps; frozen needs run.init_weights_from)")
            return logps.new_zeros(()), metrics  # evaluating a model outside DPO: its own preferences only
        losses, reward_chosen, reward_rejected = preference_losses(
            chosen, rejected, ref[0], ref[1], tokens[:n], tokens[n:], loss=o.loss, beta=o.beta)
        loss = losses.sum()
        margins = reward_chosen - reward_rejected
        metrics.update({"rewards/chosen": (reward_chosen.sum(), pairs), "rewards/rejected": (reward_rejected.sum(), pairs),
                        "rewards/margins": (margins.sum(), pairs),
                        "rewards/accuracy": ((margins > 0).float().sum(), pairs),
                        "preference_loss": (losses.detach().sum(), pairs)})
        if o.nll_weight:
            nll = (-chosen / tokens[:n]).sum()
            loss = loss + o.nll_weight * nll
            metrics["nll"] = (nll.detach(), pairs)
        if aux:
            loss = add_aux_losses(loss, metrics, aux, self.aux_loss_weights, n)
        return loss, metrics

    def _reference(self, batch, reference) -> tuple[torch.Tensor, torch.Tensor] | None:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if reference is not None:
            return reference_logps(reference, batch)
        return None

    def data_source(self, cfg, *, tokenizer_hash: str | None = None):
        """The run's batches: the prepared pairs directory named in data.stable, with the cached reference
        log-probs attached when options.reference is cached."""
        from minicpm.data.pairs import PairsData, read_reference, reference_fingerprint

        directory = pairs_directory(cfg)
        data = PairsData(directory, seed=cfg.run.seed, seq_len=cfg.batch.seq_len, tokenizer_hash=tokenizer_hash)
        if self.options.reference == "cached":
            if not cfg.run.init_weights_from:
                raise MiniCPMError("objective dpo: set run.init_weights_from to the checkpoint DPO starts from (the "
                                   "reference whose log-probs are cached)")
            fingerprint = reference_fingerprint(cfg.run.init_weights_from, cfg.run.dtype)
            data.attach_reference(read_reference(directory, fingerprint, "train", how=_how(cfg, directory)))
        return data


def _how(cfg, directory) -> str:
    return f"minicpm dpo precompute-ref {cfg.run.init_weights_from} --data {directory} --dtype {cfg.run.dtype}"


def pairs_directory(cfg) -> Path:
    """The one prepared pairs directory a DPO run reads: the single entry of data.stable."""
    dirs = list(cfg.data.stable)
    if len(dirs) != 1:
        raise MiniCPMError(f"objective dpo reads one prepared pairs directory, given as data.stable={{DIR: 1.0}}; "
                           f"got {len(dirs)} entries")
    return Path(dirs[0])


# ---------------------------------------------------------------------------------------------------- the cache

def reference_model(source: str | Path, device: torch.device) -> torch.nn.Module:
    """The reference as the train module builds its frozen one: fp32 weights, eval mode, no gradients."""
    from minicpm.model.build import build_model
    from minicpm.checkpoints.verify import resolve_verified_weights
    from minicpm.checkpoints.weights import source_model_config
    from minicpm.train.checkpoint import load_weights_only

    root = resolve_verified_weights(source)
    model = build_model(source_model_config(root), device=device)
    load_weights_only(root, model)
    model.requires_grad_(False)
    return model.eval()


def precompute_reference(source: str | Path, data: str | Path, *, batch_size: int = 8, device: str = "auto",
                         dtype: str = "auto", progress: bool = False) -> Path:
    """Compute the reference model's answer log-probs of every pair (train and val) once and store them next to the
    data; returns the file. Batches are the training rows (padded to the dataset's pad_to) in index order."""
    from minicpm.data.pairs import PreparedPairs, pair_rows, reference_fingerprint, write_reference
    from minicpm.train.distributed import init_distributed, resolve_dtype

    if batch_size < 1:
        raise MiniCPMError(f"--batch-size {batch_size}: must be at least 1")
    if dtype not in ("auto", "bf16", "fp32"):
        raise MiniCPMError(f"--dtype {dtype!r}: expected auto, bf16 or fp32 (the DPO run's run.dtype)")
    device_ = init_distributed(device).device
    dtype = resolve_dtype(dtype, device_)
    prepared = PreparedPairs(data)
    model = reference_model(source, device_)
    top = prepared.max_token()
    if top >= model.config.vocab_size:
        raise MiniCPMError(f"{data}: token id {top} is past the reference's vocabulary ({model.config.vocab_size})")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for split, pairs in prepared.splits.items():
        chosen, rejected = [], []
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device_) for k, v in pair_rows(pairs[start:start + batch_size], prepared.pad_to,
                                                             prepared.pad_id).items()}
            with torch.autocast(device_.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                c, r = reference_logps(model, batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        empty = torch.zeros(0)
        out[split] = {"chosen": torch.cat(chosen) if chosen else empty,
                      "rejected": torch.cat(rejected) if rejected else empty}
    fingerprint = reference_fingerprint(source, dtype)
    info = {"source": str(Path(source).resolve()), "dtype": dtype, "device": device_.type}
    return write_reference(data, fingerprint, out, info)
