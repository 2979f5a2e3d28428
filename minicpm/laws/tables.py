"""Reading what the fits consume: tables of runs, run directories, loss curves and LR schedules.

Every reader checks its input and raises MiniCPMError with one line naming the file, line and column at fault,
so the fitting code can assume positive, finite numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from minicpm.errors import MiniCPMError
from minicpm.files import json_object_line
from minicpm.model.config import ModelConfig, preset
from minicpm.rundir import METRICS_FILE, MODEL_CONFIG_FILE, RunDir

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


@dataclass
class Curve:
    """A training curve: the LR at logged steps (the schedule) and the loss at logged steps."""

    name: str
    lr_steps: np.ndarray
    lr: np.ndarray
    loss_steps: np.ndarray
    loss: np.ndarray


# ------------------------------------------------------------------------------------------- tables of runs

def positive_cell(value: Any, where: str, column: str) -> float:
    """A table cell as a positive finite number (NaN when empty); anything else is one line naming `where` and the
    column."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MiniCPMError(f"{where}: column {column!r} is not a number: {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise MiniCPMError(f"{where}: column {column!r} must be a positive finite number, got {value!r}")
    return x


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(location, record) pairs from a CSV or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MiniCPMError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise MiniCPMError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise MiniCPMError(f"{path}: is a directory without metrics.jsonl") from None
    records: list[tuple[str, dict]] = []
    if path.suffix in (".jsonl", ".json"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            records.append((f"{path}:{i}", json_object_line(line, f"{path}:{i}")))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise MiniCPMError(f"{path}: empty file (expected a CSV header)")
        for i, row in enumerate(reader, 2):
            records.append((f"{path}:{i}", {k.strip(): v for k, v in row.items() if k is not None}))
    return records


ALIASES = {"N": "params", "D": "tokens"}
"""The columns of a campaign's table (DIR/campaign.csv: size,N,D,flops,loss,bpb,run) under the fit's names."""


def _check_sizes(records: list[tuple[str, dict]], source: str) -> None:
    """A campaign table trains each size at several token counts: a size with one row lost its other branches."""
    counts: dict[str, list[str]] = {}
    for where, rec in records:
        counts.setdefault(str(rec.get("size")), []).append(where)
    for size, rows in counts.items():
        if len(rows) < 2:
            raise MiniCPMError(f"{rows[0]}: size {size!r} has one point; a campaign's sizes need at least 2 token "
                               f"counts each (is a branch missing?)")


def _table_from_records(records: list[tuple[str, dict]], source: str, required: tuple[str, ...]) -> RunTable:
    if not records:
        raise MiniCPMError(f"{source}: no rows")
    records = [(where, {ALIASES.get(k, k) if ALIASES.get(k, k) not in rec else k: v for k, v in rec.items()})
               for where, rec in records]
    present = set().union(*(r.keys() for _, r in records))
    for col in required:
        if col not in present:
            optional = [c for c in ("params", "tokens", "flops", "run", "batch_tokens") if c not in required]
            raise MiniCPMError(f"{source}: missing column {col!r} (need {', '.join(required)}; "
                               f"optional {', '.join(optional)})")
    cols: dict[str, list[float]] = {c: [] for c in NUMERIC_COLUMNS}
    runs: list[str] = []
    for where, rec in records:
        for col in NUMERIC_COLUMNS:
            x = positive_cell(rec.get(col), where, col)
            if col in required and math.isnan(x):
                raise MiniCPMError(f"{where}: column {col!r} is empty")
            cols[col].append(x)
        run = rec.get("run")
        runs.append(str(run) if run not in (None, "") else where)
    if all("size" in rec for _, rec in records):
        _check_sizes(records, source)
    arr = {c: np.asarray(v, dtype=float) for c, v in cols.items()}
    optional = {c: (arr[c] if np.isfinite(arr[c]).any() else None) for c in ("flops", "batch_tokens")}
    return RunTable(arr["params"], arr["tokens"], arr["loss"], runs, optional["flops"],
                    optional["batch_tokens"], source)


def load_table(path: str | Path, required: tuple[str, ...] = ("params", "tokens", "loss")) -> RunTable:
    """A CSV or JSONL table with columns params, tokens, loss (optional flops, run, batch_tokens)."""
    path = Path(path)
    return _table_from_records(read_records(path), str(path), required)


# ------------------------------------------------------------------------------------------- run directories

def run_model_config(run_dir: Path) -> ModelConfig:
    """The run's model, from config.yaml's `model` section (a preset name and/or HF fields) or a config.json."""
    run = RunDir(run_dir)
    cfg_path = run.config_file
    if cfg_path.exists():
        model = run.read_config_dict().get("model")
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
    for candidate in [run_dir / MODEL_CONFIG_FILE, *(c / MODEL_CONFIG_FILE for c in run.list_checkpoints())]:
        if candidate.exists():
            return ModelConfig.load(candidate)
    raise MiniCPMError(f"{run_dir}: cannot tell the model size: no config.yaml with a 'model' section "
                       f"(preset name or hidden_size, num_hidden_layers, ...) and no config.json")


def _metrics(run_dir: Path) -> list[tuple[str, dict]]:
    """(location, record) of every record of a run's metrics.jsonl (a torn last line of a killed run is skipped)."""
    run = RunDir(run_dir)
    if not run.metrics_file.exists():
        raise MiniCPMError(f"{run_dir}: no {run.metrics_file.name} (is this a run directory?)")
    return [(f"{run.metrics_file} record {i}", r) for i, r in enumerate(run.read_metrics(), 1)]


def run_dir_row(run_dir: str | Path, loss_key: str = "eval_loss") -> dict[str, Any]:
    """(params, tokens, loss) of a finished run: N from its model config, its last eval loss (or `loss_key`, e.g.
    eval_bpb: the paper fits per-byte loss, §4.5) and the tokens seen then."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if not run.metrics_file.exists():
        raise MiniCPMError(f"{run_dir}: no {run.metrics_file.name} (is this a run directory?)")
    last = run.last_eval(loss_key)
    if last is None:
        raise MiniCPMError(f"{run.metrics_file}: no line with a finite {loss_key!r}")
    where = f"{run.metrics_file}: step {last.get('step')}"
    if not math.isfinite(last[loss_key]):
        raise MiniCPMError(f"{where}: the last {loss_key!r} is {last[loss_key]} (the run diverged): leave the run "
                           f"out of the fit")
    if "tokens" not in last:
        raise MiniCPMError(f"{where}: no 'tokens' on the eval line or on any training line before it")
    return {"params": run_model_config(run_dir).non_embedding_params(), "tokens": last["tokens"],
            "loss": last[loss_key], "run": run_dir.name}


def load_runs(inputs: list[str | Path], required: tuple[str, ...] = ("params", "tokens", "loss"),
              loss_key: str = "eval_loss") -> RunTable:
    """Rows from any mix of tables (CSV/JSONL) and run directories (`run_dir_row`), concatenated."""
    if not inputs:
        raise MiniCPMError("no input: give a table (CSV/JSONL) or run directories")
    records: list[tuple[str, dict]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            records.append((str(p), run_dir_row(p, loss_key)))
        else:
            table_records = read_records(p)
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
        path = RunDir(path).metrics_file
        records = _metrics(path.parent)
    else:
        records = read_records(path)
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
    name = path.parent.name if path.name == METRICS_FILE else path.stem
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
    """The LR at every step 0..last from a CSV (step, lr; `lr_per_step` conventions) or a schedule YAML."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MiniCPMError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise MiniCPMError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise MiniCPMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return schedule_lr_from_config(cfg, str(path))
    records = read_records(path)
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



def schedule_lr_from_config(cfg: Any, source: str) -> np.ndarray:
    """The LR at every step 0..total_steps of the trainer's schedule (minicpm/optim/schedule.py), so a prediction
    uses exactly the LRs a run with this config would. Accepts a run's config.yaml (`optim.lr` and a `schedule`
    section) or a small YAML: `lr` plus the schedule keys, at the top level or under `schedule:`."""
    from minicpm.train.config import ScheduleConfig  # the trainer's config layer (omegaconf) only when a YAML is given

    if not isinstance(cfg, dict):
        raise MiniCPMError(f"{source}: expected a mapping with lr and schedule keys")
    optim = cfg.get("optim") if isinstance(cfg.get("optim"), dict) else {}
    lr = cfg.get("lr", optim.get("lr"))
    section = cfg["schedule"] if isinstance(cfg.get("schedule"), dict) else \
        {k: v for k, v in cfg.items() if k not in ("lr", "optim")}
    known = {f.name for f in dataclasses.fields(ScheduleConfig)}
    unknown = sorted(k for k in section if k not in known)
    if unknown:
        raise MiniCPMError(f"{source}: unknown schedule key {unknown[0]!r}; known: lr, {', '.join(sorted(known))}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise MiniCPMError(f"{source}: lr (or optim.lr) must be a positive number, got {lr!r}")
    for key in ("total_steps", "warmup_steps", "decay_steps", "decay_start", "cosine_period"):
        value = section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise MiniCPMError(f"{source}: schedule key {key!r} must be an integer, got {value!r}")
    for key in ("half_life", "floor"):
        value = section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MiniCPMError(f"{source}: schedule key {key!r} must be a number, got {value!r}")
    try:
        schedule = ScheduleConfig(**section).resolve()
    except MiniCPMError as e:
        raise MiniCPMError(f"{source}: {e}") from None
    return trainer_lr_per_step(lr, schedule, schedule.total_steps)


def trainer_lr_per_step(lr: float, schedule: Any, total_steps: int) -> np.ndarray:
    """The LR at steps 0..total_steps as the trainer logs it: metrics step s is the s-th update, taken at
    lr·schedule(s − 1) (train/loop.py), and step 0 is before any update, LR 0 (as lr_per_step reads logged curves;
    the multi-power law's lr_0, from which the warmup's rises count)."""
    return lr * np.array([0.0] + [schedule(step) for step in range(total_steps)])
