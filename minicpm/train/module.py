"""The train module (OLMo-core's TrainModule, torchtitan's Config → build()): everything one optimizer step needs,
built from the config in one place — the model with its parallelism and precision, an optional frozen reference
model wrapped the same way, AdamW over the μP parameter groups, and the objective. The loop (train/loop.py)
drives it through `train_step` and the evaluators through `eval_step`; neither knows which objective it runs.

One optimizer step over this process's micro-batches:
  1. the objective's target count is summed over the micro-batches and the processes: the global batch's count;
  2. each micro-batch's summed loss, divided by that count, is back-propagated (accumulating gradients); under
     several processes FSDP2 sums the gradients, so the gradient is the global batch's mean;
  3. the gradients are clipped; AdamW steps unless the loss or gradient norm is NaN/Inf;
  4. the loss and the objective's named metrics are summed over micro-batches and processes and returned as means.
The learning rate of each μP group is `lr · group["lr_scale"]`, set from the loop's lr at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from minicpm.errors import MiniCPMError
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig
from minicpm.optim.mup import param_groups
from minicpm.rundir import RunDir
from minicpm.train import checkpoint as ckpt
from minicpm.train.distributed import (DistInfo, apply_activation_checkpointing, apply_compile, apply_fsdp,
                                       clip_grad_norm, fused_adamw_supported, resolve_dtype, run_compile_choice)
from minicpm.train.objectives import Objective, build_objective


class TrainModule:
    """Model (+ frozen reference), optimizer, parallelism, precision and objective; one public step each for
    training and evaluation."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                 dist_info: DistInfo, *, config, reference: torch.nn.Module | None = None):
        self.model, self.optimizer, self.objective, self.dist = model, optimizer, objective, dist_info
        self.reference = reference
        self.config = config
        self._eval_objectives: dict[str, Objective] = {}
        self.compile_choice = None
        """Whether the blocks were compiled and why (a distributed.CompileChoice; set by build)."""
        self.dynamics = None
        if getattr(config.run, "dynamics", False):  # paper §4.4 diagnostics (train/dynamics.py)
            from minicpm.train.dynamics import DecayDynamics

            params = list(model.parameters())
            self.dynamics = DecayDynamics(params, sharded=any(hasattr(p, "to_local") for p in params))

    # --- building ----------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg, model_config: ModelConfig, dist_info: DistInfo) -> "TrainModule":
        """From a TrainConfig: model and optimizer initialised from run.seed, parallelism and compile applied."""
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype=resolve_dtype(cfg.run.dtype,
                                                                                              dist_info.device)))
        objective = build_objective(cfg.objective)
        # parallel.compile resolved (auto: where the run earns the compile time back); `minicpm train` prints why
        compiled = run_compile_choice(cfg, model_config, dist_info)
        model = _wrapped_model(cfg, model_config, dist_info, compiled=compiled.compile)
        model.balance_form = cfg.objective.balance_loss  # MoE: per layer (Switch) or pooled (Mixtral), model/moe.py
        reference = None
        if objective.needs_reference:
            if not cfg.run.init_weights_from:
                raise MiniCPMError(f"objective.kind {cfg.objective.kind} needs a reference model: set "
                                   f"run.init_weights_from to the checkpoint it starts from")
            reference = _wrapped_model(cfg, model_config, dist_info, frozen=True, compiled=compiled.compile)
            ckpt.load_weights_only(cfg.run.init_weights_from, reference)
        o = cfg.optim
        groups = param_groups(model, lr=o.lr, weight_decay=o.weight_decay, embedding_in_2d_group=o.embedding_in_2d_group,
                              mup_lr_scaling=o.mup_lr_scaling, eps=o.eps)
        fused = fused_adamw_supported(dist_info.device)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
        module = cls(model, optimizer, objective, dist_info, config=cfg, reference=reference)
        module.compile_choice = compiled
        return module

    # --- what evaluators see -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist.distributed:
            dist.all_reduce(tensor)
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.config.run.dtype == "bf16")

    # --- steps -------------------------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]], *, lr: float) -> dict[str, Any]:
        """One optimizer step over this process's micro-batches at learning rate `lr` (the μP groups scale it).

        Returns {"loss", "grad_norm", "applied", **the objective's named metrics}: loss and metrics are means over
        the global batch's counted targets; applied is False when a NaN/Inf loss or gradient norm skipped the update.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        device = self.dist.device
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
        count = sum(self.objective.count(mb) for mb in micro_batches)
        if self.dist.distributed:
            count_t = torch.tensor(count, dtype=torch.int64, device=device)
            dist.all_reduce(count_t)
            count = int(count_t)
        count = max(count, 1)
        loss_total = torch.zeros((), dtype=torch.float32, device=device)
        sums: dict[str, list[torch.Tensor]] = {}
        with self._step_balance(micro_batches):
            for micro in micro_batches:
                with self.autocast():
                    loss, metrics = self.objective.loss(self.model, micro,
                                                        chunk_size=self.config.parallel.loss_chunk_size,
                                                        reference=self.reference)
                # normalised by the global batch's count: FSDP sums the processes' gradients into the global mean's
                (loss / count).backward()
                loss_total += loss.detach().float()
                for name, (value, n) in metrics.items():
                    acc = sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=device)] * 2)
                    sums[name] = [acc[0] + value.detach().double(),
                                  acc[1] + torch.as_tensor(n, device=device).double()]
        loss_value, named = self._reduce(loss_total, sums)
        loss_value /= count
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        dynamics = self.dynamics.gradient() if self.dynamics is not None else {}  # the raw gradient, unclipped
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)
        applied = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            if self.dynamics is not None:
                named.update(dynamics, **self.dynamics.updated())
        elif self.dynamics is not None:
            self.dynamics.skipped()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": grad_norm, "applied": applied, **named}

    @contextlib.contextmanager
    def _step_balance(self, micro_batches: Sequence[dict[str, torch.Tensor]]):
        """MoE with objective.balance_over=step: the balance loss counts f over the whole step (model/moe.py
        StepBalance), by a no-grad pre-pass of the objective over the micro-batches when there are several."""
        model = self.model
        if not getattr(model.config, "num_experts", 0) or self.config.objective.balance_over != "step":
            yield
            return
        from minicpm.model.moe import StepBalance

        balance = StepBalance(self.all_reduce if self.dist.distributed else None)
        model.step_balance = balance
        try:
            if len(micro_batches) > 1:
                balance.counting = True
                # the forwards with gradients draw the same router jitter as the pre-pass did
                cuda = [self.dist.device] if self.dist.device.type == "cuda" else []
                with torch.no_grad(), torch.random.fork_rng(devices=cuda), self.autocast():
                    for micro in micro_batches:
                        self.objective.loss(model, micro, chunk_size=self.config.parallel.loss_chunk_size,
                                            reference=self.reference)
                balance.finish_counting()
            yield
        finally:
            model.step_balance = None

    def _reduce(self, loss_total: torch.Tensor, sums: dict[str, list[torch.Tensor]]) -> tuple[float, dict[str, float]]:
        """Sum the loss and the metrics' (sum, count) over processes in one all-reduce; metrics become sum/count."""
        names = sorted(sums)
        if self.dist.distributed:
            packed = torch.stack([loss_total.double()] + [t for n in names for t in sums[n]])
            dist.all_reduce(packed)
            loss_total, flat = packed[0], packed[1:].tolist()
        else:
            flat = [float(t) for n in names for t in sums[n]]
        named = {n: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else math.nan for i, n in enumerate(names)}
        return float(loss_total), named

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor], objective: str | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Named (sum, count) over one batch, without gradients, under the run's objective or another registered
        kind (the held-out loss evaluator measures next_token whatever the run trains): {"loss": ..., **metrics}."""
        chosen = self.objective if objective is None else self._eval_objective(objective)
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                loss, metrics = chosen.loss(self.model, batch, chunk_size=self.config.parallel.loss_chunk_size,
                                            reference=self.reference)
        finally:
            self.model.train(was_training)
        count = torch.tensor(float(chosen.count(batch)), device=self.dist.device)
        return {"loss": (loss.detach().float(), count), **metrics}

    def _eval_objective(self, kind: str) -> Objective:
        if kind == self.config.objective.kind:
            return self.objective
        if kind not in self._eval_objectives:
            from minicpm.train.config import ObjectiveConfig

            self._eval_objectives[kind] = build_objective(
                ObjectiveConfig(kind=kind, aux_loss_weights=dict(self.config.objective.aux_loss_weights)))
        return self._eval_objectives[kind]

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save(self, run: RunDir, step: int, trainer_state: dict[str, Any], *, keep_last: int,
             tokenizer: str | None, chat_template=None) -> Path | None:
        """Save weights, optimizer and the loop's state as RUN/checkpoints/step_N (every process takes part when
        sharded); returns the checkpoint on the process that published it."""
        if self.dist.distributed:  # every rank writes its shards; rank 0 the config and trainer state
            return ckpt.save_sharded_checkpoint(run, step, self.model, self.optimizer, trainer_state,
                                                keep_last=keep_last, is_main=self.dist.is_main)
        return ckpt.save_checkpoint(run, step, self.model, self.optimizer, trainer_state, keep_last=keep_last,
                                    tokenizer=tokenizer, chat_template=chat_template)

    def load(self, checkpoint: Path) -> None:
        """Exact state of a checkpoint of either format: weights and optimizer moments (N processes' shards into
        M, or one process's safetensors into shards)."""
        ckpt.load_training_state(checkpoint, self.model, self.optimizer)

    def load_weights(self, source: str | Path) -> None:
        """A weights-only start: only the source's weights; the optimizer stays fresh."""
        ckpt.load_weights_only(source, self.model)


def _wrapped_model(cfg, model_config: ModelConfig, dist_info: DistInfo, *, frozen: bool = False,
                   compiled: bool = False) -> torch.nn.Module:
    """fp32 master weights (bf16 only inside autocast); the same seed on every rank gives identical replicas."""
    model = build_model(model_config, device=dist_info.device, seed=cfg.run.seed,
                        embedding_in_2d_group=cfg.optim.embedding_in_2d_group)
    if frozen:
        model.requires_grad_(False)
        model.eval()
    else:
        model.train()
    # torchtitan's order: checkpointing inside compile inside FSDP's per-block hooks
    if not frozen:
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    if compiled:
        apply_compile(model)
    if dist_info.distributed:
        apply_fsdp(model, dist_info, param_dtype=_fsdp_param_dtype(cfg, dist_info), reduce_dtype=torch.float32)
    return model


def _fsdp_param_dtype(cfg, dist_info: DistInfo) -> torch.dtype | None:
    """Gathered-parameter dtype under FSDP2: parallel.fsdp_param_dtype, else bf16 on GPU when run.dtype is bf16;
    on CPU fp32 (autocast still computes the matmuls in bf16), as one process would."""
    name = cfg.parallel.fsdp_param_dtype
    if name is None:
        name = cfg.run.dtype if dist_info.device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else None
