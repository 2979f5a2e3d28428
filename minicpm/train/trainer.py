"""The training loop (DESIGN section 1): one loop for pretraining and the decay stage; later stages (SFT, DPO)
bring their own data and objective to the same loop.

One optimizer step:
  1. every process draws the same global batch (so losses and schedule do not depend on the process count) and
     takes its contiguous slice of rows;
  2. it accumulates gradients over micro-batches, each summed loss divided by the target-token count of the
     whole global batch;
  3. under several processes the model is sharded with FSDP2, which sums the gradients over processes (so the
     gradient is the whole global batch's); they are clipped; AdamW steps unless the loss or gradient is NaN/Inf;
  4. the step is logged, evaluated and checkpointed on its intervals (rank 0 logs; every rank writes its shards).
The learning rate is base_lr · schedule(step) · the group's muP lr_scale, recomputed from the step each time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from minicpm.config import (DataConfig, TrainConfig, batch_plan, model_config, save_config, with_model)
from minicpm.errors import MiniCPMError
from minicpm.eval.loss import evaluate
from minicpm.optim.mup import build_model, param_groups
from minicpm.optim.schedule import Schedule
from minicpm.train import checkpoint as ckpt
from minicpm.train.distributed import (DistInfo, apply_activation_checkpointing, apply_compile, apply_fsdp,
                                       clip_grad_norm, device_peak_flops, fused_adamw_supported, init_distributed)
from minicpm.train.losses import IGNORE_INDEX, lm_loss
from minicpm.train.metrics import (METRICS_FILE, IntervalStats, MetricsWriter, Progress, Throughput, format_record,
                                   truncate_metrics)


# ------------------------------------------------------------------------------------------ what a step computes

class Objective(Protocol):
    """A training loss: pretraining's next-token loss here; SFT and DPO bring their own."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Targets the loss sums over in a (global) batch; the loss is normalised by it."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int | None) -> torch.Tensor:
        """The summed loss of a micro-batch."""


class NextTokenObjective:
    """Cross-entropy of each next token whose label is not IGNORE_INDEX."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch, *, chunk_size=None):
        hidden = model.hidden_states(batch["input_ids"])
        return lm_loss(hidden, model.head_weight, batch["labels"], chunk_size=chunk_size)


class DataSource(Protocol):
    """Where global batches come from: deterministic in the step and the saved state."""

    def next_batch(self, step: int, sequences: int) -> dict[str, torch.Tensor]: ...

    def stage(self, step: int) -> str:
        """The name of the training stage a step belongs to (logged with each metrics line)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rows_to_batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed rows of seq_len+1 tokens → inputs and next-token labels."""
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class PretrainData:
    """The stable-stage and decay-stage mixtures (paper section 5, two-stage pretraining); the schedule says
    which stage a step belongs to. Without a decay mixture the stable one continues through the decay.

    At its first step the decay mixture takes over each shared dataset's reading position from the stable one,
    so the decay does not revisit what the stable stage read; a decay branched from a checkpoint at step N thus
    sees the same data as the run's own decay starting at N would.
    """

    def __init__(self, data: DataConfig, schedule: Schedule, *, seq_len: int, seed: int,
                 tokenizer_hash: str | None = None):
        from minicpm.data.mixture import Mixture

        if not data.stable:
            raise MiniCPMError("data.stable is empty: give at least one prepared dataset directory, "
                               "e.g. data.stable={path/to/shards: 1.0}")
        self.schedule = schedule
        self.stable = Mixture(dict(data.stable), seq_len=seq_len, seed=seed, tokenizer_hash=tokenizer_hash)
        self.decay = (Mixture(dict(data.decay), seq_len=seq_len, seed=seed, tokenizer_hash=tokenizer_hash)
                      if data.decay else None)
        self.decay_started = False

    def stage(self, step: int) -> str:
        return "decay" if self.decay is not None and self.schedule.in_decay(step) else "stable"

    def next_batch(self, step: int, sequences: int) -> dict[str, torch.Tensor]:
        if self.stage(step) == "stable":
            return rows_to_batch(self.stable.next_batch(sequences))
        if not self.decay_started:
            self.decay.load_state_dict(self.stable.state_dict(), streams_only=True)
            self.decay_started = True
        return rows_to_batch(self.decay.next_batch(sequences))

    def state_dict(self) -> dict[str, Any]:
        return {"stable": self.stable.state_dict(),
                "decay": self.decay.state_dict() if self.decay_started else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stable.load_state_dict(state["stable"])
        if state.get("decay") is not None and self.decay is not None:
            self.decay.load_state_dict(state["decay"])
            self.decay_started = True


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    last_train: dict[str, Any]
    last_eval: dict[str, Any]
    checkpoint: Path | None
    is_main: bool = True
    """False on every process but rank 0 of a torchrun job: only rank 0 reports."""


class Trainer:
    """Builds the model, optimizer and data from a TrainConfig and runs (or resumes, or branches) the loop."""

    def __init__(self, cfg: TrainConfig, *, objective: Objective | None = None, data: DataSource | None = None,
                 dist_info: DistInfo | None = None):
        if not cfg.run.out_dir:
            raise MiniCPMError("run.out_dir is not set: pass --out DIR or run.out_dir=DIR")
        self.cfg = cfg
        self.run_dir = Path(cfg.run.out_dir)
        self.dist = dist_info or init_distributed(cfg.run.device)
        self.schedule = cfg.schedule.resolve()
        self.plan = batch_plan(cfg.batch, self.dist.world_size)
        self.tokenizer_hash, vocab_size = _tokenizer_facts(cfg.data.tokenizer)
        self.model_config = model_config(cfg, vocab_size)
        self.model = self._build_model()
        self.optimizer = self._build_optimizer()
        self.objective = objective or NextTokenObjective()
        self.data = data if data is not None else PretrainData(
            cfg.data, self.schedule, seq_len=cfg.batch.seq_len, seed=cfg.run.seed, tokenizer_hash=self.tokenizer_hash)
        self.step = 0
        self.tokens = 0
        self.interval = IntervalStats()
        self.bad_steps = 0

    # --- building -----------------------------------------------------------------------------------------

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        # fp32 master weights; bf16 only inside autocast. The same seed on every rank gives identical replicas.
        model = build_model(self.model_config, device=self.dist.device, seed=cfg.run.seed,
                            embedding_in_2d_group=cfg.optim.embedding_in_2d_group)
        model.train()
        # torchtitan's order: checkpointing inside compile inside FSDP's per-block hooks
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
        if cfg.parallel.compile:
            apply_compile(model)
        if self.dist.distributed:
            apply_fsdp(model, self.dist, param_dtype=self._fsdp_param_dtype(), reduce_dtype=torch.float32)
        return model

    def _fsdp_param_dtype(self) -> torch.dtype | None:
        """Gathered-parameter dtype under FSDP2: parallel.fsdp_param_dtype, else bf16 on GPU when run.dtype is
        bf16; on CPU fp32 (autocast still computes the matmuls in bf16), as one process would."""
        name = self.cfg.parallel.fsdp_param_dtype
        if name is None:
            name = self.cfg.run.dtype if self.dist.device.type == "cuda" else "fp32"
        return torch.bfloat16 if name == "bf16" else None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = param_groups(self.model, lr=o.lr, weight_decay=o.weight_decay,
                              embedding_in_2d_group=o.embedding_in_2d_group)
        fused = fused_adamw_supported(self.dist.device)
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.cfg.run.dtype == "bf16")

    # --- the loop -----------------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train to schedule.total_steps; resume=True continues the run directory's latest checkpoint."""
        self._start(resume)
        cfg, total = self.cfg, self.schedule.total_steps
        main = self.dist.is_main
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.run.tensorboard) if main else None
        progress = Progress(start=self.step, total=total, enabled=cfg.run.progress and main)
        peak = device_peak_flops(self.dist.device, torch.bfloat16 if cfg.run.dtype == "bf16" else torch.float32)
        throughput = Throughput(self.model_config.flops_per_token(cfg.batch.seq_len), peak * self.dist.world_size)
        validation = self._validation_sets()
        last_train: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}
        saved = None
        try:
            while self.step < total:
                stage = self.data.stage(self.step)
                loss, grad_norm, lr, ok = self._train_step()
                self.step += 1
                self.tokens += cfg.batch.tokens_per_step
                throughput.add(cfg.batch.tokens_per_step)
                self._account(loss, grad_norm, ok, progress)
                record = None
                if self.step % cfg.run.log_every == 0 or self.step == total:
                    record = {"step": self.step, "tokens": self.tokens, "lr": lr, "stage": stage,
                              **self.interval.summary(), **throughput.read()}
                    self.interval = IntervalStats()
                    last_train = record
                    if main:
                        writer.write(record)
                        if not progress.enabled:
                            progress.print(format_record(record))
                progress.update(record)
                if validation and (_due(self.step, cfg.run.eval_every) or self.step == total):
                    last_eval = {"step": self.step, "tokens": self.tokens, **self._evaluate(validation)}
                    if main:
                        writer.write(last_eval)
                        progress.print(format_record(last_eval))
                if (_due(self.step, cfg.run.checkpoint_every) or self.step == total) and not self.bad_steps:
                    # never during a run of skipped steps: the newest checkpoint stays the last good one
                    saved = self._save()
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        return TrainResult(self.run_dir, self.step, self.tokens, last_train, last_eval,
                           saved or ckpt.latest_checkpoint(self.run_dir), is_main=main)

    def _train_step(self) -> tuple[float, float, float, bool]:
        """One optimizer step at self.step: (loss, grad norm, lr, whether the update was applied)."""
        cfg, plan = self.cfg, self.plan
        factor = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * factor * group["lr_scale"]
        batch = self.data.next_batch(self.step, plan.sequences)
        count = max(self.objective.count(batch), 1)
        first = self.dist.rank * plan.per_rank
        total = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        mb = cfg.batch.micro_batch_size
        for i in range(plan.accumulation):
            rows = slice(first + i * mb, first + (i + 1) * mb)
            micro = {k: v[rows].to(self.dist.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast():
                loss = self.objective.loss(self.model, micro, chunk_size=cfg.parallel.loss_chunk_size)
            # normalised by the global batch's count: FSDP sums the processes' gradients into the global mean's
            (loss / count).backward()
            total += loss.detach().float()
        if self.dist.distributed:
            dist.all_reduce(total)
        loss_value = total.item() / count
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)
        ok = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, cfg.optim.lr * factor, ok

    def _account(self, loss: float, grad_norm: float, ok: bool, progress: Progress) -> None:
        if ok:
            self.bad_steps = 0
            self.interval.add(loss, grad_norm)
            return
        self.bad_steps += 1
        self.interval.skipped += 1
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        if self.dist.is_main:
            progress.print(f"step {self.step}: {what} is {loss if what == 'loss' else grad_norm}; "
                           f"step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.run.max_bad_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise MiniCPMError(
                f"step {self.step}: {self.bad_steps} steps in a row had a NaN/Inf loss or gradient "
                f"(run.max_bad_steps); stopped. Last good checkpoint: {last or 'none written yet'}. "
                f"Try a lower optim.lr or a longer schedule.warmup_steps")

    # --- evaluation ---------------------------------------------------------------------------------------

    def _validation_sets(self) -> dict[str, torch.Tensor]:
        """Held-out rows of every dataset of both stages, read once (the same rows at every evaluation)."""
        n = self.cfg.data.eval_sequences
        dirs = list(dict.fromkeys([*self.cfg.data.stable, *(self.cfg.data.decay or {})]))
        if not n or not dirs:
            return {}
        from minicpm.data.mixture import bytes_per_token, validation_batches

        names = _short_names(dirs)
        sets, self._bytes_per_token = {}, {}
        for name, path in zip(names, dirs):
            sets[name] = validation_batches([path], seq_len=self.cfg.batch.seq_len, max_sequences=n,
                                            tokenizer_hash=self.tokenizer_hash)
            self._bytes_per_token[name] = bytes_per_token([path])
        return sets

    def _evaluate(self, sets: dict[str, torch.Tensor]) -> dict[str, float]:
        return evaluate(self.model, sets, self._bytes_per_token, batch_size=self.cfg.batch.micro_batch_size,
                        device=self.dist.device, rank=self.dist.rank, world_size=self.dist.world_size,
                        autocast=self.autocast, chunk_size=self.cfg.parallel.loss_chunk_size)

    # --- checkpoints --------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data": self.data.state_dict(),
                "rng": ckpt.rng_state(), "interval": dataclasses.asdict(self.interval),
                "bad_steps": self.bad_steps, "world_size": self.dist.world_size,
                "schedule": self.schedule.describe()}

    def _save(self) -> Path | None:
        path = None
        if self.dist.distributed:  # every rank writes its shards; rank 0 the config and trainer state
            path = ckpt.save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                                self.trainer_state(), keep_last=self.cfg.run.keep_last,
                                                is_main=self.dist.is_main)
        elif self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                        keep_last=self.cfg.run.keep_last, tokenizer=self.cfg.data.tokenizer)
        return path

    def _load(self, checkpoint: Path) -> None:
        # either format into either layout: N processes' shards into M, or one process's safetensors into shards
        ckpt.load_training_state(checkpoint, self.model, self.optimizer)
        state = ckpt.read_trainer_state(checkpoint)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.interval = IntervalStats(**state["interval"])
        self.bad_steps = int(state["bad_steps"])

    def _start(self, resume: bool) -> None:
        """Decide where the run starts (its own checkpoint, a source checkpoint, or step 0) and record its config."""
        own = ckpt.latest_checkpoint(self.run_dir)
        metrics = self.run_dir / METRICS_FILE
        if not resume and (own is not None or (metrics.is_file() and metrics.stat().st_size)):
            raise MiniCPMError(f"{self.run_dir} already holds a run ({own.name if own else METRICS_FILE}); pass "
                               f"--resume to continue it, or choose another --out")
        if self.dist.is_main:
            ckpt.remove_incomplete(self.run_dir)
        source = own if own is not None else (ckpt.resolve_checkpoint(self.cfg.run.init_from)
                                              if self.cfg.run.init_from else None)
        if source is not None:
            if own is None and _inside(source, self.run_dir):
                raise MiniCPMError(f"run.init_from {source} lies inside the run directory {self.run_dir}; "
                                   f"branch into a new --out")
            self._load(source)
            if own is None and self.step >= self.schedule.total_steps:
                raise MiniCPMError(f"{source} is at step {self.step}, but schedule.total_steps is "
                                   f"{self.schedule.total_steps}: nothing to train (raise total_steps or "
                                   f"pass --decay-steps)")
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.step if own is not None else -1)
            save_config(self.resolved_config(), self.run_dir / "config.yaml")
            self._announce(source)
        if self.dist.distributed:
            dist.barrier()

    def resolved_config(self) -> TrainConfig:
        """The config with the model written out and paths made absolute, as the run directory records it."""
        cfg = with_model(self.cfg, self.model_config)
        absolute = lambda mix: {os.path.abspath(k): v for k, v in mix.items()} if mix else mix  # noqa: E731
        data = dataclasses.replace(cfg.data, stable=absolute(cfg.data.stable), decay=absolute(cfg.data.decay),
                                   tokenizer=cfg.data.tokenizer and os.path.abspath(cfg.data.tokenizer))
        run = dataclasses.replace(cfg.run, init_from=cfg.run.init_from and os.path.abspath(cfg.run.init_from))
        return dataclasses.replace(cfg, data=data, run=run)

    def _announce(self, source: Path | None) -> None:
        m, cfg = self.model_config, self.cfg
        start = f"resuming {source} at step {self.step}" if source else "starting at step 0"
        print(f"minicpm train: {self.run_dir} ({start})\n"
              f"  model: {m.total_params() / 1e6:.2f}M parameters ({m.non_embedding_params() / 1e6:.2f}M "
              f"non-embedding), d={m.hidden_size}, L={m.num_hidden_layers}, vocab {m.vocab_size}\n"
              f"  batch: {cfg.batch.tokens_per_step:,} tokens/step = {self.plan.sequences} x {cfg.batch.seq_len}; "
              f"{self.dist.world_size} process(es) x {self.plan.accumulation} micro-batches of "
              f"{cfg.batch.micro_batch_size}\n"
              f"  schedule: {self.schedule.describe()}; lr {cfg.optim.lr:g}\n"
              f"  device: {self.dist.device}, {cfg.run.dtype}", flush=True)


def train(cfg: TrainConfig, *, resume: bool = False, objective: Objective | None = None,
          data: DataSource | None = None) -> TrainResult:
    """Run (or resume, or branch) a training run described by cfg; under torchrun, on all its processes."""
    trainer = Trainer(cfg, objective=objective, data=data)
    result = trainer.fit(resume=resume)
    if trainer.dist.distributed and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another is still in a collective
        dist.destroy_process_group()  # the run's process group ends with it (NCCL warns if left open)
    return result


def _short_names(paths: list[str]) -> list[str]:
    """Each dataset's directory name, or its whole path where two names would clash."""
    names = [Path(p).name or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
        return True
    except ValueError:
        return False


def _tokenizer_facts(path: str | None) -> tuple[str | None, int | None]:
    """(hash, vocab size) of the run's tokenizer, or (None, None) without one."""
    if not path:
        return None, None
    from minicpm.data.tokenizer import load_tokenizer, tokenizer_hash, vocab_size

    tokenizer = load_tokenizer(path)
    return tokenizer_hash(tokenizer), vocab_size(tokenizer)
