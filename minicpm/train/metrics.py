"""What a run reports: metrics.jsonl, optional TensorBoard, throughput and MFU, a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of RUN/metrics.jsonl (a torn last line, from a killed run, is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep the records up to `step`: a resumed run rewrites what came after its checkpoint."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        kept = [json.dumps(r) for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        write_atomic(path, "".join(line + "\n" for line in kept))


class MetricsWriter:
    """Appends one JSON object per line to RUN/metrics.jsonl and mirrors scalars to TensorBoard if asked."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MiniCPMError("run.tensorboard needs the tensorboard package: "
                                   "pip install 'minicpm[tensorboard]'") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


@dataclass
class IntervalStats:
    """Train loss and gradient norm accumulated between two metrics lines (saved in checkpoints, so a resumed
    run writes the same lines)."""

    loss_sum: float = 0.0
    grad_norm_sum: float = 0.0
    steps: int = 0
    skipped: int = 0

    def add(self, loss: float, grad_norm: float) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.steps:
            out.update(loss=self.loss_sum / self.steps, grad_norm=self.grad_norm_sum / self.steps)
        if self.skipped:
            out["skipped_steps"] = self.skipped
        return out


@dataclass
class Throughput:
    """Tokens per second and model FLOPs utilisation over the wall-clock time between two reads."""

    flops_per_token: float
    peak_flops: float
    _start: float = field(default_factory=time.perf_counter)
    _tokens: int = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / seconds
        self._start, self._tokens = now, 0
        return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak_flops}


class Progress:
    """A tqdm bar over the optimizer steps (ETA included); without one, metrics lines are printed instead."""

    def __init__(self, *, start: int, total: int, enabled: bool):
        self.enabled = enabled
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                             mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def update(self, record: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if record and "loss" in record:
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_record(record: dict[str, Any]) -> str:
    """A metrics record as one readable line."""
    parts = [f"step {record['step']}", f"tokens {record['tokens']:,}"]
    for key, value in record.items():
        if key in ("step", "tokens", "stage"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if math.isfinite(value) else f"{key} {value}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)
