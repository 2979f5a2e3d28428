"""A job: one training run in its own run directory, described so that any launcher can start it.

    RUN/job.json   what the job runs: `work` (a module-level function, by import path), its keyword arguments, the
                   torch threads; written before every start, read back by the child process (minicpm.jobs.child)
    RUN/job.log    the child's output, appended to on every start (a resumed job adds to its first attempt's log)

The work is a function so that a campaign's stable run (trained in stages), a decay branch and a plain
`minicpm train` all go through one engine; the engine imports nothing of theirs.
"""

from __future__ import annotations

import importlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minicpm.files import read_json_object, write_atomic

JOB_FILE = "job.json"
JOB_LOG = "job.log"


def train_recipe(config: str, overrides: list[str], run_dir: str) -> Any:
    """`minicpm train CONFIG OVERRIDES --out RUN --resume`: a fresh run starts at step 0, an interrupted one
    continues its own checkpoint, a finished one has nothing left to do."""
    from minicpm.train.launch import launch_config
    from minicpm.train.loop import train

    return train(launch_config(config, list(overrides), out=run_dir, resume=True), resume=True)


@dataclass
class Job:
    """One training run: work(**kwargs), writing run_dir, started once ready()."""

    name: str
    run_dir: Path
    kwargs: dict[str, Any] = field(default_factory=dict)
    work: Callable[..., Any] = train_recipe
    """A module-level function (a child process imports it by name); by default train_recipe."""
    ready: Callable[[], bool] = lambda: True
    """Whether it can start now (a decay branch: its source checkpoint exists)."""
    blocked_by: str | None = None
    """The job whose failure means this one can never start."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        work_path(self.work)  # a lambda or a nested function could not be found by a child process

    def run(self) -> Any:
        """The work, in this process."""
        return self.work(**self.kwargs)

    @property
    def log(self) -> Path:
        return self.run_dir / JOB_LOG

    def command_line(self, nproc_per_node: int = 1) -> str:
        """The job as a person would type it (the first line of each attempt in RUN/job.log)."""
        prefix = f"torchrun --standalone --nproc_per_node {nproc_per_node} -m " if nproc_per_node > 1 else ""
        if self.work is train_recipe:
            k = self.kwargs
            return " ".join([f"{prefix}minicpm train", k["config"], *k["overrides"], "--out", k["run_dir"], "--resume"])
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{prefix}{work_path(self.work)}({arguments})"

    def write_file(self, threads: int) -> Path:
        """RUN/job.json, for a child process to run; returns its absolute path."""
        text = json.dumps({"name": self.name, "work": work_path(self.work), "kwargs": self.kwargs,
                           "threads": threads, "run_dir": str(self.run_dir.resolve())}, indent=1, default=_path_text)
        return write_atomic(self.run_dir.resolve() / JOB_FILE, text + "\n")

    def append_to_log(self, line: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(line + "\n")


@dataclass
class JobFile:
    """RUN/job.json as read back in the child."""

    work: Callable[..., Any]
    kwargs: dict[str, Any]
    threads: int
    log: Path


def read_job_file(path: str | Path) -> JobFile:
    record = read_json_object(path)
    return JobFile(resolve_work(record["work"]), record["kwargs"], int(record["threads"]),
                   Path(record["run_dir"]) / JOB_LOG)


def work_path(work: Callable[..., Any]) -> str:
    """module:function of a module-level function."""
    name = getattr(work, "__qualname__", "")
    if not name or "." in name or "<" in name:
        raise ValueError(f"a job's work must be a module-level function, got {work!r}")
    return f"{work.__module__}:{name}"


def resolve_work(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _path_text(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a job's arguments must be JSON values or paths, got {value!r}")


def failure_line(log: Path, returncode: int) -> str:
    """The one line that says why a job failed: the `error:` line, a traceback's last line, or the signal that
    killed it (SIGKILL is what the kernel's out-of-memory killer sends)."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip(" =-")]  # not the rules of a torchrun failure banner
    except OSError:
        lines = []
    for line in reversed(lines[-200:]):  # a torchrun job ends on its agent's long traceback
        if ": error: " in line:
            return line.split(": error: ", 1)[1]
    return lines[-1] if lines else f"exit status {returncode}"
