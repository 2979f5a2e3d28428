"""What a run reports: metrics.jsonl, optional TensorBoard, throughput and MFU against the device's peak FLOP/s,
a progress bar with ETA."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import torch

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object, write_atomic
from minicpm.rundir import RunDir


class MetricsWriter:
    """Appends one JSON object per line to RUN/metrics.jsonl and mirrors scalars to TensorBoard if asked."""

    def __init__(self, run: RunDir, *, tensorboard: bool = False, wandb: bool = False):
        self.path = run.metrics_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = open_wandb(run) if wandb else None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MiniCPMError("run.tensorboard needs the tensorboard package: "
                                   "pip install 'minicpm[tensorboard]'") from None
            self._tb = SummaryWriter(str(run.path / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=record["step"])
        if self._wandb is not None:
            self._wandb.log({key: value for key, value in record.items() if key != "step"
                             and isinstance(value, (int, float)) and not isinstance(value, bool)}, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def open_wandb(run: RunDir):
    """A W&B run logging into RUN/wandb: offline unless WANDB_MODE says otherwise (`wandb sync RUN/wandb/offline-*`
    uploads it later), its id fixed by the run directory so that a resumed run continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        raise MiniCPMError("run.wandb needs the wandb package: pip install 'minicpm[wandb]'") from None
    import hashlib

    path = run.path.resolve()
    (path / "wandb").mkdir(parents=True, exist_ok=True)
    run_id = f"{path.name[:40]}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return wandb.init(dir=str(path), project=os.environ.get("WANDB_PROJECT", "minicpm"), name=path.name, id=run_id,
                      resume="allow", mode=os.environ.get("WANDB_MODE", "offline"))


@dataclass
class IntervalStats:
    """The named values of each applied step (loss, grad_norm, the objective's metrics) between two metrics lines,
    averaged over the steps when a line is written; saved in checkpoints, so a resumed run writes the same lines."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Steps that gave each metric, where some step did not (a metric that needs the previous step)."""

    def add(self, values: dict[str, float]) -> None:
        for key in self.sums.keys() - values.keys():  # every earlier step had it, this one does not
            self.counts.setdefault(key, self.steps)
        for key, value in values.items():
            if key not in self.sums and self.steps:  # earlier steps did not have it
                self.counts.setdefault(key, 0)
            self.sums[key] = self.sums.get(key, 0.0) + value
            if key in self.counts:
                self.counts[key] += 1
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: total / max(self.counts.get(key, self.steps), 1)
                               for key, total in self.sums.items()} if self.steps else {}
        if self.skipped:
            out["skipped_steps"] = self.skipped
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"sums": dict(self.sums), "steps": self.steps, "skipped": self.skipped}
        if self.counts:
            state["counts"] = dict(self.counts)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IntervalStats":
        if "sums" not in state:  # checkpoints written before named metrics: loss_sum and grad_norm_sum
            sums = {"loss": state["loss_sum"], "grad_norm": state["grad_norm_sum"]} if state["steps"] else {}
            return cls(sums, int(state["steps"]), int(state["skipped"]))
        return cls({k: float(v) for k, v in state["sums"].items()}, int(state["steps"]), int(state["skipped"]),
                   {k: int(v) for k, v in state.get("counts", {}).items()})


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


_NOT_IN_BAR = ("lr", "grad_norm", "tokens_per_s", "mfu")


class Progress:
    """A tqdm bar over the optimizer steps (ETA included); without one, metrics lines are printed instead."""

    def __init__(self, *, start: int, total: int, enabled: bool):
        self.enabled = enabled
        self._bar = None
        self._shown: dict[str, str] = {}
        """Fields kept on the bar between updates (the prediction at the last evaluation)."""
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                             mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def update(self, record: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if record and "loss" in record:
                # as format_record: per-layer metrics (moe/layer3/load_max) stay in metrics.jsonl
                shown = {key: f"{value:.4g}" for key, value in record.items()
                         if key not in _NOT_IN_BAR and isinstance(value, float) and key.count("/") <= 1}
                self._bar.set_postfix(lr=f"{record['lr']:.2e}", **shown, **self._shown, refresh=False)

    def show(self, **fields: str) -> None:
        """Keep these fields on the bar (an empty value removes one)."""
        self._shown.update({k: v for k, v in fields.items() if v})
        for key in [k for k, v in fields.items() if not v]:
            self._shown.pop(key, None)

    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_record(record: dict[str, Any]) -> str:
    """A metrics record as one readable line. Metrics nested two deep (an MoE's per-layer moe/layer3/load_max) stay
    in metrics.jsonl only: a line holds their summaries (moe/load_max)."""
    parts = [f"step {record['step']}", f"tokens {record['tokens']:,}"]
    for key, value in record.items():
        if key in ("step", "tokens", "stage") or key.count("/") > 1:
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if math.isfinite(value) else f"{key} {value}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


# ---------------------------------------------------------------- peak FLOP/s for MFU

# Dense bf16 tensor-core peaks from the vendors' datasheets (no 2:4 sparsity). Matched as substrings of the
# device name, first match wins, so the more specific names come first.
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("MI300X", 1307e12),
)


# Per process: what this process measured for each cache key, so it measures at most once.
_MEASURED: dict[str, float] = {}


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak FLOP/s for MFU: the datasheet bf16 figure for known GPUs, else the best matmul rate ever measured.

    Elsewhere each process measures once (best of a few 2048^3 matmuls in `dtype`, about a second) and keeps the
    highest rate seen in $XDG_CACHE_HOME/minicpm/peak.json (default ~/.cache), under the device name, dtype and
    thread count. A machine busy with other work measures low; keeping the maximum means one such reading cannot
    lower the peak for good (which would push MFU past 100%), and a later quiet run raises it to the true peak.
    """
    device = torch.device(device)
    name = _device_name(device)
    if device.type == "cuda":
        for key, flops in GPU_PEAK_BF16_FLOPS:
            if key in name:
                return flops
    cache_key = f"{device.type}|{name}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}"
    if cache_key not in _MEASURED:
        _MEASURED[cache_key] = measure_matmul_flops(device, dtype)
    cache = _peak_cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    # several processes (torchrun ranks, sweep trials) may raise the same file's entries at once: read-modify-write
    # under a file lock, so that no process's higher reading is lost
    with filelock.FileLock(str(cache) + ".lock", timeout=60):
        table = _read_json(cache)
        cached = table.get(cache_key)
        cached = float(cached) if isinstance(cached, (int, float)) else 0.0
        if _MEASURED[cache_key] > cached:
            table[cache_key] = _MEASURED[cache_key]
            write_atomic(cache, json.dumps(table, indent=2, sort_keys=True))
    return max(cached, _MEASURED[cache_key])


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5,
                         min_seconds: float = 0.02) -> float:
    """Best FLOP/s of a (n x n) @ (n x n) matmul over a few repeats, n the smallest power of two from 256 up to
    `size` whose matmul takes at least min_seconds (so a slow device, e.g. bf16 on an AVX2 CPU, is measured in
    well under a second, and a fast one at a size that fills it)."""
    n = min(256, size)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            _synchronize(device)
            start = time.perf_counter()
            a @ b
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
        if best >= min_seconds or n >= size:
            return 2 * n ** 3 / best
        n *= 2


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "minicpm" / "peak.json"


def _read_json(path: Path) -> dict:
    """The cache's table; an unreadable or damaged cache is an empty one (it only ever holds measurements)."""
    try:
        return read_json_object(path)
    except MiniCPMError:
        return {}


