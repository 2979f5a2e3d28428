"""The run directory (DESIGN §4): the one module that knows its layout. Trainer, report, fits, the quickstart and
the experiments read and write runs only through it.

    RUN/config.yaml                      the full resolved config of the run
    RUN/metrics.jsonl                    one JSON object per logged step and per evaluation
    RUN/config_changes.jsonl             each change a resume was allowed to make to config.yaml, and its step
    RUN/checkpoints/step_00001000/       a complete checkpoint (see minicpm/train/checkpoint.py for its files)
    RUN/checkpoints/latest               the name of the newest complete checkpoint
    RUN/checkpoints/.tmp-step_N/         a checkpoint being written (deleted when a run starts)
    RUN/.lock, RUN/.lock.owner           held by the one process that writes the run, and its pid

A checkpoint directory is complete once trainer_state.json (written last) is there beside the weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_lines, write_atomic

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
LOCK_FILE = ".lock"

# the files of one checkpoint
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
MODEL_CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
SHARDS_DIR = "dcp"

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """The step in a checkpoint directory's name (None for a directory not named step_N)."""
    match = _STEP_DIR.match(Path(checkpoint).name)
    return int(match.group(1)) if match else None


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether a checkpoint holds DCP shards (written by several processes) rather than safetensors weights."""
    return (Path(checkpoint) / SHARDS_DIR / ".metadata").is_file()


def has_weights(directory: str | Path) -> bool:
    """Whether a directory holds model weights in any layout we read: ours, the official HF one, or DCP shards."""
    directory = Path(directory)
    return ((directory / MODEL_CONFIG_FILE).is_file()
            and ((directory / WEIGHTS_FILE).is_file() or (directory / WEIGHTS_INDEX_FILE).is_file()
                 or is_sharded(directory)))


def is_complete(checkpoint: str | Path) -> bool:
    """A training checkpoint whose save finished: its trainer state (written last) beside its weights."""
    checkpoint = Path(checkpoint)
    return (checkpoint / STATE_FILE).is_file() and ((checkpoint / WEIGHTS_FILE).is_file() or is_sharded(checkpoint))


class RunDir:
    """One run directory: where its files are, which checkpoints it has, its records, and its writer's lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def is_run(self) -> bool:
        """Whether this directory holds (the start of) a run: a config, records or checkpoints."""
        return self.config_file.is_file() or self.metrics_file.is_file() or self.checkpoints_dir.is_dir()

    def has_started(self) -> bool:
        """Whether training has written anything a fresh start would overwrite: a checkpoint or metrics."""
        return self.latest_checkpoint() is not None or (self.metrics_file.is_file()
                                                         and self.metrics_file.stat().st_size > 0)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    def temporary_checkpoint_name(self, step: int) -> str:
        """The hidden name a checkpoint is written under before it is renamed into place."""
        return f".tmp-{checkpoint_name(step)}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(step, p) for p in self.checkpoints_dir.iterdir()
                 if (step := checkpoint_step(p)) is not None and is_complete(p)]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, or, if that one is missing or incomplete, the newest complete one."""
        pointer = self.checkpoints_dir / LATEST
        if pointer.is_file():
            try:
                name = pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            named = self.checkpoints_dir / name
            if _STEP_DIR.match(name) and is_complete(named):
                return named
        found = self.list_checkpoints()
        return found[-1] if found else None

    def step_directories(self) -> list[Path]:
        """Every RUN/checkpoints/step_N directory, complete or not, newest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(step, p) for p in self.checkpoints_dir.iterdir() if (step := checkpoint_step(p)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    def latest_pointer(self) -> tuple[Path | None, str | None]:
        """(the complete checkpoint `latest` names, None) or (None, what is wrong with the pointer); (None, None)
        when there is no pointer."""
        pointer = self.checkpoints_dir / LATEST
        if not pointer.exists():
            return None, None
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{pointer}: unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
        named = self.checkpoints_dir / name
        if not _STEP_DIR.match(name):
            return None, f"{pointer}: {name[:40]!r} is not a checkpoint name (step_N)"
        if not is_complete(named):
            return None, f"{pointer}: names {name}, which is not a complete checkpoint"
        return named, None

    def set_latest(self, checkpoint: Path) -> None:
        write_atomic(self.checkpoints_dir / LATEST, checkpoint.name + "\n")

    def prune_checkpoints(self, keep_last: int) -> None:
        """Delete all but the newest keep_last complete checkpoints (0 keeps all)."""
        if keep_last:
            for stale in self.list_checkpoints()[:-keep_last]:
                shutil.rmtree(stale)

    def remove_incomplete(self) -> None:
        """Delete the hidden temporary directories a killed save leaves behind."""
        if self.checkpoints_dir.is_dir():
            for p in self.checkpoints_dir.iterdir():
                if p.is_dir() and p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True)

    # --- records -----------------------------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (a torn last line, from a killed run, is ignored)."""
        return read_json_lines(self.metrics_file)

    def last_eval(self, key: str = "eval_loss", *, step: int | None = None) -> dict[str, Any] | None:
        """The run's last evaluation: the last record of metrics.jsonl that logged `key` as a number (the last at
        `step`, when given), None when there is none. An eval line without tokens gets those of the last training
        line at or before its step. A non-finite value (a diverged run) is returned as logged: the caller judges."""
        records = self.read_metrics()
        for record in reversed(records):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (step is None or record.get("step") == step):
                if "tokens" not in record:
                    at = record.get("step", math.inf)
                    seen = [r["tokens"] for r in records if "tokens" in r and r.get("step", -1) <= at]
                    record = {**record, "tokens": seen[-1]} if seen else record
                return record
        return None

    def truncate_metrics(self, step: int) -> None:
        """Keep the records up to `step`: a resumed run rewrites what came after its checkpoint."""
        if self.metrics_file.is_file():
            kept = [json.dumps(r) for r in self.read_metrics() if r.get("step", 0) <= step]
            write_atomic(self.metrics_file, "".join(line + "\n" for line in kept))

    @property
    def config_changes_file(self) -> Path:
        return self.path / CONFIG_CHANGES_FILE

    def record_config_change(self, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """Add to config_changes.jsonl that from `step` on the run trains with `changes` ({key: (before, after)})."""
        records = [json.dumps(r) for r in read_json_lines(self.config_changes_file) if r.get("step", 0) <= step]
        records.append(json.dumps({"step": step, "changes": {key: {"from": before, "to": after}
                                                             for key, (before, after) in changes.items()}}))
        write_atomic(self.config_changes_file, "".join(line + "\n" for line in records))

    def read_config_text(self) -> str:
        """config.yaml as written (empty when the run has none)."""
        return self.config_file.read_text(encoding="utf-8") if self.config_file.is_file() else ""

    def read_config_dict(self) -> dict[str, Any]:
        """config.yaml as plain data, without validating it against the current config types."""
        import yaml

        text = self.read_config_text()
        try:
            data = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as e:
            raise MiniCPMError(f"{self.config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MiniCPMError(f"{self.config_file}: expected a mapping of config sections")
        return data

    def source_checkpoint(self) -> Path | None:
        """The checkpoint a branch or continuation started from (run.init_from in its config), if any."""
        run = self.read_config_dict().get("run") or {}
        source = run.get("init_from") if isinstance(run, dict) else None
        return Path(source) if source else None

    # --- the one writer ----------------------------------------------------------------------------------------

    def lock(self) -> "RunLock":
        return RunLock(self)


class RunLock:
    """The run directory's single-writer lock (an OS file lock through filelock, so that the lock of a killed
    process is released by the kernel and never blocks). The holder's pid and host sit beside it for the error
    that a second writer gets."""

    def __init__(self, run: RunDir):
        import filelock

        self.run = run
        self.owner_file = run.path / f"{LOCK_FILE}.owner"
        self._lock = filelock.FileLock(str(run.path / LOCK_FILE), timeout=0, thread_local=False)

    def acquire(self) -> "RunLock":
        import filelock

        self.run.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise MiniCPMError(f"{self.run.path}: another process ({self._holder()}) is writing this run directory; "
                               f"wait for it to end, or choose another --out") from None
        write_atomic(self.owner_file, f"pid {os.getpid()} on {socket.gethostname()}\n")
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()

    def release_leaving_nothing(self, *, lock_file_was_there: bool, directory_was_there: bool) -> None:
        """Release after a refused start: the lock file goes too if this writer made it (unlinked while still
        held, so no other writer can be holding the one deleted), and so does the run directory if this writer
        made it and nothing else is in it."""
        if self._lock.is_locked and not lock_file_was_there:
            Path(self._lock.lock_file).unlink(missing_ok=True)
        self.release()
        if not directory_was_there:
            try:
                self.run.path.rmdir()
            except OSError:  # not empty: something else was written there
                pass

    def _holder(self) -> str:
        try:
            return self.owner_file.read_text(encoding="utf-8").strip() or "pid unknown"
        except OSError:
            return "pid unknown"

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_of(checkpoint: str | Path) -> RunDir:
    """The run directory a checkpoint (RUN/checkpoints/step_N) belongs to."""
    return RunDir(Path(checkpoint).parent.parent)


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete training checkpoint, given either that directory or a run directory (then its latest)."""
    path = Path(path)
    if is_complete(path):
        return path
    run = RunDir(path)
    if run.checkpoints_dir.is_dir():
        latest = run.latest_checkpoint()
        if latest is None:
            raise MiniCPMError(f"{path}: the run has no complete checkpoint")
        return latest
    if not path.exists():
        raise MiniCPMError(f"{path}: no such checkpoint or run directory")
    raise MiniCPMError(f"{path}: not a checkpoint (no {STATE_FILE} with {WEIGHTS_FILE} or {SHARDS_DIR}/) "
                       f"nor a run directory")


def resolve_weights(path: str | Path) -> Path:
    """A directory of model weights for a weights-only start: a run directory (its latest checkpoint), one of our
    checkpoints, a sharded one, or an official HF model directory (config.json + safetensors)."""
    path = Path(path)
    if RunDir(path).checkpoints_dir.is_dir() and not has_weights(path):
        return resolve_checkpoint(path)
    if has_weights(path):
        return path
    if not path.exists():
        raise MiniCPMError(f"{path}: no such checkpoint, model or run directory")
    raise MiniCPMError(f"{path}: no model weights (config.json with {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or "
                       f"{SHARDS_DIR}/) and not a run directory")
