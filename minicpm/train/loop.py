"""The one training loop (DESIGN §1): pretraining, the decay stage and every later stage run here; what differs is
the data, the objective and the evaluators, which the config names and the registries build.

Each step the loop draws the global batch (every process draws the same one, so losses and the schedule do not
depend on the process count), gives this process's contiguous rows, cut into micro-batches, to the train module's
`train_step` at the schedule's learning rate, and logs, evaluates and checkpoints on their intervals (rank 0 logs;
every rank writes its shards). The schedule is a pure function of the step.

Three ways to start, never mixed (DESIGN §2): `resume` (this run's own latest checkpoint: exact state),
run.init_from (`--from`, a branch: weights, optimizer, step and data state of another run's checkpoint) and
run.init_weights_from (weights only: step 0, a fresh optimizer, this run's own data, schedule and objective).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minicpm.checkpoints.verify import newest_verified, resolve_verified, resolve_verified_weights
from minicpm.checkpoints.weights import source_model_config
from minicpm.train.config import (TrainConfig, batch_plan, config_differences, import_plugins, load_config,
                                  model_config, save_config, with_model)
from minicpm.data.pretrain import DataSource, PretrainData, tokenizer_facts
from minicpm.data.prepare_chat import training_template
from minicpm.errors import MiniCPMError
from minicpm.eval.evaluators import EvalSetup, Evaluator, build_evaluators
from minicpm.rundir import LOCK_FILE, RunDir
from minicpm.train import checkpoint as ckpt
from minicpm.train.batch_ramp import batch_ramp
from minicpm.train.distributed import DistInfo, has_fast_bf16, init_distributed, resolve_dtype
from minicpm.train.metrics import IntervalStats, MetricsWriter, Progress, Throughput, device_peak_flops, format_record
from minicpm.train.module import TrainModule
from minicpm.train.prediction import LivePrediction, load_plan_prediction
from minicpm.train.start_lr import lr_where_source_ended


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

    def summary(self) -> str:
        """What `minicpm train` prints at the end."""
        parts = [f"done: {self.run_dir} at step {self.step} ({self.tokens:,} tokens)"]
        if "loss" in self.last_train:
            parts.append(f"train loss {self.last_train['loss']:.4f}")
        if "eval_loss" in self.last_eval:
            parts.append(f"eval loss {self.last_eval['eval_loss']:.4f}, {self.last_eval['eval_bpb']:.4f} bits/byte")
        return ("; ".join(parts) + f"\ncheckpoint: {self.checkpoint}\nmetrics: {RunDir(self.run_dir).metrics_file}\n"
                f"report: minicpm report {self.run_dir}")


class Trainer:
    """Builds the train module, data and evaluators from a TrainConfig and runs (or resumes, or branches) the loop."""

    def __init__(self, cfg: TrainConfig, *, data: DataSource | None = None, dist_info: DistInfo | None = None):
        if not cfg.run.out_dir:
            raise MiniCPMError("run.out_dir is not set: pass --out DIR or run.out_dir=DIR")
        import_plugins(cfg.run.plugins)
        self.dist = dist_info or init_distributed(cfg.run.device)
        # the run records the precision it trains in (auto resolved for this device)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype=resolve_dtype(cfg.run.dtype,
                                                                                              self.dist.device)))
        self.cfg = cfg = self._start_lr(cfg)
        self.run = RunDir(cfg.run.out_dir)
        self.schedule = cfg.schedule.resolve()
        self.plan = batch_plan(cfg.batch, self.dist.world_size)
        self.ramp = batch_ramp(cfg.batch)
        # every batch size of the ramp checked against the process count before the first step
        self.plans = {tokens: batch_plan(dataclasses.replace(cfg.batch, tokens_per_step=tokens),
                                         self.dist.world_size) for tokens in self.ramp.sizes()}
        self.tokenizer_hash, vocab_size = tokenizer_facts(cfg.data.tokenizer)
        self.model_config = model_config(cfg, vocab_size, base=self._weights_source_config())
        self.module = TrainModule.build(cfg, self.model_config, self.dist)
        own_data = getattr(self.module.objective, "data_source", None)  # an objective with its own data (DPO pairs)
        if data is not None:
            self.data = data
        elif own_data is not None:
            self.data = own_data(cfg, tokenizer_hash=self.tokenizer_hash)
        else:
            self.data = PretrainData(cfg.data.stable, cfg.data.decay, self.schedule, seq_len=cfg.batch.seq_len,
                                     seed=cfg.run.seed, tokenizer_hash=self.tokenizer_hash, packing=cfg.data.packing)
        if hasattr(self.data, "check_token_ids"):  # ids past the embedding would fail mid-run (or read garbage)
            self.data.check_token_ids(self.model_config.vocab_size)
        self.chat_template = training_template([*cfg.data.stable, *(cfg.data.decay or {})]) if data is None else None
        for name, n in (self.data.skipped_too_long() if hasattr(self.data, "skipped_too_long") else {}).items():
            if n:
                self._warn(f"{name}: {n} conversation(s) longer than batch.seq_len + 1 = {cfg.batch.seq_len + 1} "
                           f"tokens are skipped (no row holds them whole)")
        self.evaluators: list[Evaluator] = build_evaluators(cfg.evaluators, EvalSetup(cfg, self.tokenizer_hash))
        self.prediction = LivePrediction(load_plan_prediction(cfg.run.prediction)) if cfg.run.prediction else None
        self.step = 0
        self.tokens = 0
        self.interval = IntervalStats()
        self.bad_steps = 0

    def _start_lr(self, cfg: TrainConfig) -> TrainConfig:
        """optim.lr_from_source: the LR where the weights' source run ended (train/start_lr.py)."""
        if not (cfg.optim.lr_from_source and cfg.run.init_weights_from):
            return cfg
        source = resolve_verified_weights(cfg.run.init_weights_from, strict=cfg.run.strict_checkpoints)
        found = lr_where_source_ended(source)
        if found is None:
            self._warn(f"optim.lr_from_source: {source} is not a checkpoint of one of our runs (no schedule to read); "
                       f"starting at optim.lr {cfg.optim.lr:g}")
            return cfg
        lr, how = found
        if self.dist.is_main:
            print(f"optim.lr {lr:.4g}: where the source's schedule ended ({how})", flush=True)
        return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))

    def _weights_source_config(self):
        """For a weights-only start whose config names no model preset: the source's own architecture, under the
        model.* fields the config does give (abf-ntk's NTK stages set only rope_scaling and max_position_embeddings
        on top of the ABF weights)."""
        source = self.cfg.run.init_weights_from
        if not source or self.cfg.model.preset is not None:
            return None
        return source_model_config(resolve_verified_weights(source, strict=self.cfg.run.strict_checkpoints))

    # --- the loop ----------------------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, allow_config_change: bool = False) -> TrainResult:
        """Train to schedule.total_steps; resume=True continues the run directory's latest checkpoint, with the
        config it recorded (a changed one is refused unless allow_config_change, which records the change)."""
        lock = self.run.lock() if self.dist.is_main else None
        was_there = {"directory_was_there": self.run.path.is_dir(),
                     "lock_file_was_there": (self.run.path / LOCK_FILE).exists()}
        if lock is not None:
            lock.acquire()
        self._started = False
        try:
            return self._fit(resume, allow_config_change)
        except BaseException:
            if lock is not None and not self._started:  # refused before it began: nothing left behind
                lock.release_leaving_nothing(**was_there)
            raise
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool, allow_config_change: bool) -> TrainResult:
        self._start(resume, allow_config_change)
        self._started = True
        cfg, total = self.cfg, self.schedule.total_steps
        main = self.dist.is_main
        writer = MetricsWriter(self.run, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb) if main else None
        progress = Progress(start=self.step, total=total, enabled=cfg.run.progress and main)
        peak = device_peak_flops(self.dist.device, torch.bfloat16 if cfg.run.dtype == "bf16" else torch.float32)
        throughput = Throughput(self.model_config.flops_per_token(cfg.batch.seq_len), peak * self.dist.world_size)
        last_train: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}
        saved = None
        try:
            while self.step < total:
                stage = self.data.stage(self.step)
                lr = cfg.optim.lr * self.schedule(self.step)
                step_tokens = self.ramp.tokens_per_step(self.step)
                metrics = self.module.train_step(self._micro_batches(self.plans[step_tokens]), lr=lr)
                self.step += 1
                self.tokens += step_tokens
                throughput.add(step_tokens)
                self._account(metrics, progress)
                record = None
                if self.step % cfg.run.log_every == 0 or self.step == total:
                    record = {"step": self.step, "tokens": self.tokens, "lr": lr, "stage": stage,
                              **self.interval.summary(), **throughput.read()}
                    if self.ramp.stages:
                        record["batch_tokens"] = step_tokens
                    self.interval = IntervalStats()
                    last_train = record
                    if main:
                        writer.write(record)
                        if not progress.enabled:
                            progress.print(format_record(record))
                progress.update(record)
                evaluation = self._evaluate(final=self.step == total)
                if evaluation:
                    last_eval = {"step": self.step, "tokens": self.tokens, **evaluation}
                    predicted, shown, warning = (self.prediction.evaluate(self.tokens, evaluation) if self.prediction
                                                 else ({}, "", None))
                    last_eval.update(predicted)
                    if main:
                        writer.write(last_eval)
                        progress.print(format_record(last_eval) + (f"  {shown}" if shown else ""))
                        progress.show(predicted=shown)
                        if warning:
                            progress.print(f"warning: step {self.step}: {warning}")
                if (_due(self.step, cfg.run.checkpoint_every) or self.step == total) and not self.bad_steps:
                    # never during a run of skipped steps: the newest checkpoint stays the last good one
                    saved = self.module.save(self.run, self.step, self.trainer_state(), keep_last=cfg.run.keep_last,
                                             tokenizer=cfg.data.tokenizer, chat_template=self.chat_template)
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        if self.bad_steps:  # the last steps were skipped: the weights are not what the schedule asked for
            raise MiniCPMError(
                f"the run ended on {self.bad_steps} skipped step(s) with a NaN/Inf loss or gradient (steps "
                f"{self.step - self.bad_steps + 1}..{self.step}); no checkpoint was written after them. Last good "
                f"checkpoint: {self.run.latest_checkpoint() or 'none written'}")
        return TrainResult(self.run.path, self.step, self.tokens, last_train, last_eval,
                           saved or self.run.latest_checkpoint(), is_main=main)

    def _micro_batches(self, plan) -> list[dict[str, torch.Tensor]]:
        """This process's contiguous rows of the step's global batch, cut into micro-batches."""
        mb = self.cfg.batch.micro_batch_size
        batch = self.data.next_batch(self.step, plan.sequences)
        first = self.dist.rank * plan.per_rank
        return [{k: v[first + i * mb:first + (i + 1) * mb] for k, v in batch.items()}
                for i in range(plan.accumulation)]

    def _account(self, metrics: dict[str, Any], progress: Progress) -> None:
        if metrics["applied"]:
            self.bad_steps = 0
            self.interval.add({k: v for k, v in metrics.items() if k != "applied"})
            return
        self.bad_steps += 1
        self.interval.skipped += 1
        loss, grad_norm = metrics["loss"], metrics["grad_norm"]
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        if self.dist.is_main:
            progress.print(f"step {self.step}: {what} is {loss if what == 'loss' else grad_norm}; "
                           f"step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.run.max_bad_steps:
            last = self.run.latest_checkpoint()
            raise MiniCPMError(
                f"step {self.step}: {self.bad_steps} steps in a row had a NaN/Inf loss or gradient "
                f"(run.max_bad_steps); stopped. Last good checkpoint: {last or 'none written yet'}. "
                f"Try a lower optim.lr or a longer schedule.warmup_steps")

    def _evaluate(self, *, final: bool) -> dict[str, float]:
        """Every evaluator due at this step (all of them at the last step): eval/<name>/<metric> and aliases."""
        out: dict[str, float] = {}
        for evaluator in self.evaluators:
            if not (final or _due(self.step, evaluator.every)):
                continue
            for metric, value in evaluator(self.module).items():
                out[f"eval/{evaluator.name}/{metric}"] = value
                if metric in evaluator.aliases:
                    out[evaluator.aliases[metric]] = value
        return out

    # --- checkpoints -------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data": self.data.state_dict(),
                "rng": ckpt.rng_state(), "interval": self.interval.state_dict(),
                "bad_steps": self.bad_steps, "world_size": self.dist.world_size,
                "schedule": self.schedule.describe()}

    def _load(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Exact state of a checkpoint whose trainer state (`state`) and files were verified."""
        self.module.load(checkpoint)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.interval = IntervalStats.from_state(state["interval"])
        self.bad_steps = int(state["bad_steps"])

    def _start(self, resume: bool, allow_config_change: bool = False) -> None:
        """Decide where the run starts (its own checkpoint, a branch's source, a weights-only source, or nothing)
        and record its config."""
        run, cfg = self.run, self.cfg
        if not resume and run.has_started():
            own = run.latest_checkpoint()
            raise MiniCPMError(f"{run.path} already holds a run ({own.name if own else run.metrics_file.name}); "
                               f"pass --resume to continue it, or choose another --out")
        if self.dist.is_main:
            run.remove_incomplete()
        announce = "starting at step 0"
        # a checkpoint is used only once its files match the SHA-256 manifest in its trainer_state.json
        strict = cfg.run.strict_checkpoints
        own, own_state = newest_verified(run, self._warn, strict=strict) if resume else (None, None)
        changes = self._config_changes(allow_config_change) if own is not None else {}
        if own is not None:
            self._load(own, own_state)
            announce = f"resuming {own} at step {self.step}"
            if self.dist.is_main and run.latest_pointer()[0] != own:
                run.set_latest(own)  # a damaged newer checkpoint or a bad pointer: `latest` names what verified
        elif cfg.run.init_from:
            source, state = resolve_verified(cfg.run.init_from, self._warn, strict=strict)
            if _inside(source, run.path):
                raise MiniCPMError(f"run.init_from {source} lies inside the run directory {run.path}; "
                                   f"branch into a new --out")
            self._load(source, state)
            if self.step >= self.schedule.total_steps:
                raise MiniCPMError(f"{source} is at step {self.step}, but schedule.total_steps is "
                                   f"{self.schedule.total_steps}: nothing to train (raise total_steps or "
                                   f"pass --decay-steps)")
            announce = f"resuming {source} at step {self.step}"
        elif cfg.run.init_weights_from:
            source = resolve_verified_weights(cfg.run.init_weights_from, self._warn, strict=strict)
            self.module.load_weights(source)
            announce = f"starting at step 0 from the weights of {source}"
        if self.dist.is_main:
            run.truncate_metrics(self.step if own is not None else -1)
            if changes:
                run.record_config_change(self.step, changes)
                announce += f"; config changed from this step: {', '.join(changes)} (in {run.config_changes_file})"
            save_config(self.resolved_config(), run.config_file)
            self._announce(announce)
        if self.dist.distributed:
            dist.barrier()

    def _config_changes(self, allowed: bool) -> dict[str, tuple[Any, Any]]:
        """What this resume changes in the config the run recorded; any change is refused unless `allowed`."""
        if not self.run.config_file.is_file():
            return {}
        changes = config_differences(load_config(self.run.config_file), self.resolved_config())
        if changes and not allowed:
            listed = "; ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items())
            raise MiniCPMError(f"{self.run.config_file}: resuming with a changed config ({listed}); resume with the "
                               f"recorded config, or pass --allow-config-change to record the change and go on")
        return changes

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def resolved_config(self) -> TrainConfig:
        """The config with the model written out and paths made absolute, as the run directory records it."""
        cfg = with_model(self.cfg, self.model_config)
        absolute = lambda mix: {os.path.abspath(k): v for k, v in mix.items()} if mix else mix  # noqa: E731
        path = lambda p: p and os.path.abspath(p)  # noqa: E731
        data = dataclasses.replace(cfg.data, stable=absolute(cfg.data.stable), decay=absolute(cfg.data.decay),
                                   tokenizer=path(cfg.data.tokenizer))
        run = dataclasses.replace(cfg.run, init_from=path(cfg.run.init_from),
                                  init_weights_from=path(cfg.run.init_weights_from))
        return dataclasses.replace(cfg, data=data, run=run)

    def _announce(self, start: str) -> None:
        m, cfg = self.model_config, self.cfg
        print(f"minicpm train: {self.run.path} ({start})\n"
              f"  model: {m.total_params() / 1e6:.2f}M parameters ({m.non_embedding_params() / 1e6:.2f}M "
              f"non-embedding), d={m.hidden_size}, L={m.num_hidden_layers}, vocab {m.vocab_size}\n"
              f"  batch: {cfg.batch.tokens_per_step:,} tokens/step = {self.plan.sequences} x {cfg.batch.seq_len}; "
              f"{self.dist.world_size} process(es) x {self.plan.accumulation} micro-batches of "
              f"{cfg.batch.micro_batch_size}\n"
              + (f"  batch ramp: {self.ramp.describe()}\n" if self.ramp.stages else "") +
              f"  objective: {cfg.objective.kind}; evaluators: "
              f"{', '.join(e.name for e in self.evaluators) or 'none'}\n"
              f"  schedule: {self.schedule.describe()}; lr {cfg.optim.lr:g}\n"
              f"  device: {self.dist.device}, {cfg.run.dtype}; blocks {self.module.compile_choice.reason}", flush=True)
        if cfg.run.dtype == "bf16" and not has_fast_bf16(self.dist.device):
            print(f"  warning: this {self.dist.device.type} has no native bf16 kernels; bf16 runs far slower than "
                  f"fp32 here (run.dtype=auto picks fp32)", flush=True)


def train(cfg: TrainConfig, *, resume: bool = False, data: DataSource | None = None,
          allow_config_change: bool = False) -> TrainResult:
    """Run (or resume, or branch) a training run described by cfg; under torchrun, on all its processes."""
    trainer = Trainer(cfg, data=data)
    result = trainer.fit(resume=resume, allow_config_change=allow_config_change)
    if trainer.dist.distributed and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another is still in a collective
        dist.destroy_process_group()  # the run's process group ends with it (NCCL warns if left open)
    return result


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
        return True
    except ValueError:
        return False

