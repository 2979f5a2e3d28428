"""Reading what the fits consume: tables of runs, run directories, loss curves and LR schedules.

Every reader checks its input and raises MiniCPMError with one line naming the file, line and column at fault,
so the fitting code can assume positive, finite numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from minicpm.errors import MiniCPMError
from minicpm.model.config import ModelConfig, preset

NUMERIC_COLUMNS = ("params", "tokens", "loss", "flops", "batch_tokens")


@dataclass
class RunTable:
    """One row per finished run (or decay branch): the points a scaling law is fitted to."""

    params: np.ndarray
    """Non-embedding parameters N (NaN where the column is absent)."""
    tokens: np.ndarray
    """Training tokens D (NaN where absent)."""
    loss: np.ndarray
    """Final (eval) loss."""
    run: list[str]
    """Resampling unit of each row: the `run` column, else one unit per row."""
    flops: Optional[np.ndarray] = None
    """Training compute, when the table gives it; otherwise 6·N·D is used."""
    batch_tokens: Optional[np.ndarray] = None
    """Batch size in tokens (the batch-size law's input)."""
    source: str = ""
    """Where the rows came from, for messages."""

    def __len__(self) -> int:
        return len(self.loss)

    def compute(self) -> np.ndarray:
        """Training FLOPs of each row: the table's `flops` where given, else C = 6·N·D (DESIGN §3)."""
        c = 6.0 * self.params * self.tokens
        if self.flops is not None:
            c = np.where(np.isfinite(self.flops), self.flops, c)
        return c

    def subset(self, mask_or_index: np.ndarray) -> "RunTable":
        idx = np.arange(len(self))[mask_or_index] if np.asarray(mask_or_index).dtype == bool \
            else np.asarray(mask_or_index)
        pick = (lambda a: None if a is None else a[idx])
        return RunTable(self.params[idx], self.tokens[idx], self.loss[idx], [self.run[i] for i in idx],
                        pick(self.flops), pick(self.batch_tokens), self.source)


@dataclass
class Curve:
    """A training curve: the LR at logged steps (the schedule) and the loss at logged steps."""

    name: str
    lr_steps: np.ndarray
    lr: np.ndarray
    loss_steps: np.ndarray
    loss: np.ndarray


# ------------------------------------------------------------------------------------------- tables of runs

def _number(value: Any, where: str, column: str) -> float:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MiniCPMError(f"{where}: column {column!r} is not a number: {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise MiniCPMError(f"{where}: column {column!r} must be a positive finite number, got {value!r}")
    return x


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """(location, record) pairs from a CSV or JSONL file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MiniCPMError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MiniCPMError(f"{path}: is a directory without metrics.jsonl") from None
    records: list[tuple[str, dict]] = []
    if path.suffix in (".jsonl", ".json"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MiniCPMError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise MiniCPMError(f"{path}:{i}: expected a JSON object per line")
            records.append((f"{path}:{i}", rec))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise MiniCPMError(f"{path}: empty file (expected a CSV header)")
        for i, row in enumerate(reader, 2):
            records.append((f"{path}:{i}", {k.strip(): v for k, v in row.items() if k is not None}))
    return records


def _table_from_records(records: list[tuple[str, dict]], source: str, required: tuple[str, ...]) -> RunTable:
    if not records:
        raise MiniCPMError(f"{source}: no rows")
    present = set().union(*(r.keys() for _, r in records))
    for col in required:
        if col not in present:
            raise MiniCPMError(f"{source}: missing column {col!r} (need {', '.join(required)}; "
                               f"optional flops, run, batch_tokens)")
    cols: dict[str, list[float]] = {c: [] for c in NUMERIC_COLUMNS}
    runs: list[str] = []
    for where, rec in records:
        for col in NUMERIC_COLUMNS:
            x = _number(rec.get(col), where, col)
            if col in required and math.isnan(x):
                raise MiniCPMError(f"{where}: column {col!r} is empty")
            cols[col].append(x)
        run = rec.get("run")
        runs.append(str(run) if run not in (None, "") else where)
    arr = {c: np.asarray(v, dtype=float) for c, v in cols.items()}
    optional = {c: (arr[c] if np.isfinite(arr[c]).any() else None) for c in ("flops", "batch_tokens")}
    return RunTable(arr["params"], arr["tokens"], arr["loss"], runs, optional["flops"],
                    optional["batch_tokens"], source)


def load_table(path: str | Path, required: tuple[str, ...] = ("params", "tokens", "loss")) -> RunTable:
    """A CSV or JSONL table with columns params, tokens, loss (optional flops, run, batch_tokens)."""
    path = Path(path)
    return _table_from_records(_read_records(path), str(path), required)


# ------------------------------------------------------------------------------------------- run directories

def _model_config(run_dir: Path) -> ModelConfig:
    """The run's model, from config.yaml's `model` section (a preset name and/or HF fields) or a config.json."""
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise MiniCPMError(f"{cfg_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        model = cfg.get("model") if isinstance(cfg, dict) else None
        if isinstance(model, str):
            return preset(model)
        if isinstance(model, dict):
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            fields = {k: v for k, v in model.items() if k in known and v is not None}
            name = model.get("preset") or model.get("name")
            if isinstance(name, str):
                try:
                    return dataclasses.replace(preset(name), **fields)
                except TypeError as e:
                    raise MiniCPMError(f"{cfg_path}: model: {e}") from None
            return ModelConfig.from_hf_dict(fields, source=f"{cfg_path} (model section)")
    for candidate in [run_dir / "config.json", *sorted(run_dir.glob("checkpoints/*/config.json"))]:
        if candidate.exists():
            return ModelConfig.load(candidate)
    raise MiniCPMError(f"{run_dir}: cannot tell the model size: no config.yaml with a 'model' section "
                       f"(preset name or hidden_size, num_hidden_layers, ...) and no config.json")


def _metrics(run_dir: Path) -> list[tuple[str, dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise MiniCPMError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    return _read_records(path)


def run_dir_row(run_dir: str | Path) -> dict[str, Any]:
    """(params, tokens, loss) of a finished run: N from its model config, its last eval loss and tokens then."""
    run_dir = Path(run_dir)
    records = _metrics(run_dir)
    evals = [(w, r) for w, r in records if isinstance(r.get("eval_loss"), (int, float))
             and math.isfinite(r["eval_loss"])]
    if not evals:
        raise MiniCPMError(f"{run_dir / 'metrics.jsonl'}: no line with a finite 'eval_loss'")
    where, last = evals[-1]
    tokens = last.get("tokens")
    if tokens is None:  # an eval line may omit tokens: take the last training line at or before its step
        step = last.get("step", math.inf)
        seen = [r["tokens"] for _, r in records if "tokens" in r and r.get("step", -1) <= step]
        if not seen:
            raise MiniCPMError(f"{where}: no 'tokens' on the eval line or on any training line before it")
        tokens = seen[-1]
    return {"params": _model_config(run_dir).non_embedding_params(), "tokens": tokens,
            "loss": last["eval_loss"], "run": run_dir.name}


def load_runs(inputs: list[str | Path], required: tuple[str, ...] = ("params", "tokens", "loss")) -> RunTable:
    """Rows from any mix of tables (CSV/JSONL) and run directories, concatenated."""
    if not inputs:
        raise MiniCPMError("no input: give a table (CSV/JSONL) or run directories")
    records: list[tuple[str, dict]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            records.append((str(p), run_dir_row(p)))
        else:
            table_records = _read_records(p)
            if not table_records:
                raise MiniCPMError(f"{p}: no rows")
            records.extend(table_records)
    source = str(inputs[0]) if len(inputs) == 1 else f"{len(inputs)} inputs"
    return _table_from_records(records, source, required)


# ------------------------------------------------------------------------------------------- curves

def load_curve(path: str | Path, loss_key: str = "loss") -> Curve:
    """A metrics.jsonl (or a run directory holding one) or a CSV with columns step, lr, loss.

    The schedule comes from every line with an lr, the loss from every line with `loss_key`, so eval lines
    (eval_loss, no lr) are placed on the schedule logged by the training lines.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = _read_records(path)
    lr_pts: dict[int, float] = {}
    loss_pts: dict[int, float] = {}
    for where, rec in records:
        if "step" not in rec or rec["step"] in (None, ""):
            continue
        try:
            step = int(float(rec["step"]))
        except ValueError:
            raise MiniCPMError(f"{where}: column 'step' is not a number: {rec['step']!r}") from None
        if step < 0:
            raise MiniCPMError(f"{where}: step must be >= 0, got {step}")
        if rec.get("lr") not in (None, ""):
            try:
                lr = float(rec["lr"])
            except (TypeError, ValueError):
                raise MiniCPMError(f"{where}: column 'lr' is not a number: {rec['lr']!r}") from None
            if not math.isfinite(lr) or lr < 0:
                raise MiniCPMError(f"{where}: lr must be finite and >= 0, got {rec['lr']!r}")
            lr_pts[step] = lr  # a resumed run may log a step twice: the last line wins
        value = rec.get(loss_key)
        if value not in (None, ""):
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise MiniCPMError(f"{where}: column {loss_key!r} is not a number: {value!r}") from None
            if math.isfinite(x):  # a skipped (NaN) step is not a point of the curve
                if x <= 0:
                    raise MiniCPMError(f"{where}: {loss_key} must be positive, got {value!r}")
                loss_pts[step] = x
    if len(lr_pts) < 2:
        raise MiniCPMError(f"{path}: needs at least 2 lines with step and lr (found {len(lr_pts)})")
    if not loss_pts:
        raise MiniCPMError(f"{path}: no line with step and {loss_key!r}")
    ls = np.array(sorted(lr_pts))
    ps = np.array(sorted(loss_pts))
    name = path.parent.name if path.name == "metrics.jsonl" else path.stem
    return Curve(name, ls, np.array([lr_pts[s] for s in ls]), ps, np.array([loss_pts[s] for s in ps]))


def lr_per_step(steps: np.ndarray, lr: np.ndarray, last_step: int) -> np.ndarray:
    """The LR at every step 0..last_step from logged (step, lr) rows.

    Linear between rows; before the first row it rises linearly from 0 at step 0, as a warmup does; after the
    last row it stays at the last value.
    """
    steps = np.asarray(steps, dtype=float)
    lr = np.asarray(lr, dtype=float)
    if steps[0] > 0:
        steps, lr = np.concatenate([[0.0], steps]), np.concatenate([[0.0], lr])
    return np.interp(np.arange(last_step + 1, dtype=float), steps, lr)


# ------------------------------------------------------------------------------------------- schedules

def load_schedule(path: str | Path) -> np.ndarray:
    """The LR at every step 0..last from a CSV (step, lr; `lr_per_step` conventions) or a WSD YAML."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            cfg = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise MiniCPMError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise MiniCPMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return wsd_lr_from_config(cfg, str(path))
    records = _read_records(path)
    rows = []
    for where, rec in records:
        for col in ("step", "lr"):
            if rec.get(col) in (None, ""):
                raise MiniCPMError(f"{where}: missing column {col!r} (a schedule CSV has step, lr)")
        try:
            step, lr = int(float(rec["step"])), float(rec["lr"])
        except ValueError:
            raise MiniCPMError(f"{where}: step and lr must be numbers, got {rec['step']!r}, {rec['lr']!r}") from None
        if step < 0 or not math.isfinite(lr) or lr < 0:
            raise MiniCPMError(f"{where}: need step >= 0 and a finite lr >= 0, got {step}, {rec['lr']!r}")
        rows.append((step, lr))
    if len(rows) < 2:
        raise MiniCPMError(f"{path}: a schedule needs at least 2 rows of step, lr")
    pts = dict(rows)
    steps = np.array(sorted(pts))
    return lr_per_step(steps, np.array([pts[s] for s in steps]), int(steps[-1]))


WSD_KEYS = ("lr", "warmup_steps", "stable_steps", "total_steps", "decay_steps", "decay", "half_life", "floor")


def wsd_lr(steps: np.ndarray, *, lr: float, warmup_steps: int, decay_start: int, decay_steps: int,
           decay: str = "exp", half_life: Optional[float] = None, floor: float = 0.0) -> np.ndarray:
    """WSD as in DESIGN §3: linear warmup 0 → lr over warmup_steps, lr until decay_start, then lr·f(s − start).

    f is 0.5^(s/half_life) (paper §6.2), linear, cosine or 1-sqrt over decay_steps; a floor (a fraction of lr)
    is approached as floor + (1 − floor)·f, so linear, cosine and 1-sqrt end exactly at it.
    """
    s = np.asarray(steps, dtype=float)
    into = np.clip((s - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    if decay == "exp":
        if not half_life or half_life <= 0:
            raise MiniCPMError(f"decay 'exp' needs a positive half_life, got {half_life!r}")
        f = 0.5 ** (np.maximum(s - decay_start, 0.0) / half_life)
    elif decay == "linear":
        f = 1.0 - into
    elif decay == "cosine":
        f = 0.5 * (1.0 + np.cos(math.pi * into))
    elif decay == "1-sqrt":
        f = 1.0 - np.sqrt(into)
    else:
        raise MiniCPMError(f"unknown decay {decay!r}; choose exp, linear, cosine or 1-sqrt")
    factor = np.where(s < decay_start, 1.0, floor + (1.0 - floor) * f)
    if warmup_steps > 0:
        factor = np.where(s < warmup_steps, s / warmup_steps, factor)
    return lr * factor


def wsd_lr_from_config(cfg: Any, source: str) -> np.ndarray:
    """The LR at every step 0..total_steps of a small WSD YAML (top level or under `schedule:`)."""
    if isinstance(cfg, dict) and isinstance(cfg.get("schedule"), dict):
        cfg = {**{k: v for k, v in cfg.items() if k != "schedule"}, **cfg["schedule"]}
    if not isinstance(cfg, dict):
        raise MiniCPMError(f"{source}: expected a mapping with keys {', '.join(WSD_KEYS)}")
    unknown = sorted(k for k in cfg if k not in WSD_KEYS and k != "type")
    if unknown:
        raise MiniCPMError(f"{source}: unknown key {unknown[0]!r}; a WSD schedule has {', '.join(WSD_KEYS)}")

    def num(key: str, default: Any = None, minimum: float = 0.0) -> Any:
        value = cfg.get(key, default)
        if value is None:
            raise MiniCPMError(f"{source}: missing key {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < minimum:
            raise MiniCPMError(f"{source}: {key} must be a number >= {minimum:g}, got {value!r}")
        return value

    lr = num("lr", minimum=1e-300)
    warmup = int(num("warmup_steps", 0))
    decay_steps = int(num("decay_steps"))
    if "total_steps" in cfg:
        total = int(num("total_steps", minimum=1))
    else:
        total = warmup + int(num("stable_steps")) + decay_steps
    decay = cfg.get("decay", "exp")
    half_life = num("half_life", minimum=1e-300) if decay == "exp" else None
    floor = num("floor", 0.0)
    if floor > 1:
        raise MiniCPMError(f"{source}: floor is a fraction of lr in [0, 1], got {floor!r}")
    start = total - decay_steps
    if start < warmup:
        raise MiniCPMError(f"{source}: warmup_steps {warmup} + decay_steps {decay_steps} exceed total_steps {total}")
    return wsd_lr(np.arange(total + 1), lr=lr, warmup_steps=warmup, decay_start=start, decay_steps=decay_steps,
                  decay=decay, half_life=half_life, floor=floor)
