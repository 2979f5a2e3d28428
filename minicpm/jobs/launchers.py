"""Which launcher starts a job's process, as a spec and a command line choose it:

    launcher: local            # local (default): child processes of this one | torchrun | slurm
    nproc_per_node: 2          # processes per job: torchrun, or torchrun inside each Slurm job
    slurm: {partition: gpu, gpus: 1, time: 120, cpus: 8}   # with launcher: slurm

Every launcher has start(job) -> a running job with poll(), wait(timeout), stop() and failure() (its one line).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from minicpm.errors import MiniCPMError
from minicpm.jobs.job import Job
from minicpm.jobs.local import LocalLauncher
from minicpm.jobs.slurm import SLURM_KEYS, SlurmLauncher, SlurmOptions
from minicpm.jobs.torchrun import TorchrunLauncher

LAUNCHERS = ("local", "torchrun", "slurm")
LAUNCHER_KEYS = ("launcher", "nproc_per_node", "slurm")


class RunningJob(Protocol):
    where: str
    """Where it runs, for people: pid 1234, slurm job 5678."""

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""

    def wait(self, timeout: float) -> int | None:
        """Wait up to timeout seconds; the exit status, or None while it runs."""

    def stop(self) -> None:
        """End it (SIGTERM, then SIGKILL; a Slurm job: cancel it)."""

    def failure(self) -> str:
        """Why it failed, in one line."""


class Launcher(Protocol):
    kind: str

    def start(self, job: Job) -> RunningJob:
        """Write RUN/job.json and start its process."""


@dataclass
class LauncherConfig:
    kind: str = "local"
    """local: child processes of this one; torchrun: each job a `torchrun --standalone` job; slurm: each a Slurm job."""
    nproc_per_node: int = 1
    """Processes per job (torchrun, or torchrun inside each Slurm job)."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    cluster: str = "slurm"
    """submitit's cluster for kind slurm: slurm, or local (submitit's local executor runs the jobs here)."""

    def updated(self, **given: Any) -> "LauncherConfig":
        """A copy with the values given on a command line (None: keep the spec's): kind, nproc_per_node and the
        Slurm options by name."""
        given = {k: v for k, v in given.items() if v is not None}
        slurm = dataclasses.replace(self.slurm, **{k: given.pop(k) for k in list(given)
                                                   if k in {f.name for f in dataclasses.fields(SlurmOptions)}})
        config = dataclasses.replace(self, slurm=slurm, **given)
        config.check()
        return config

    def check(self) -> None:
        if self.kind not in LAUNCHERS:
            raise MiniCPMError(f"launcher: expected {' | '.join(LAUNCHERS)}, got {self.kind!r}")
        if self.nproc_per_node < 1:
            raise MiniCPMError(f"nproc_per_node: expected a positive integer, got {self.nproc_per_node}")
        if self.nproc_per_node > 1 and self.kind == "local":
            raise MiniCPMError(f"nproc_per_node: {self.nproc_per_node} processes per run need launcher: torchrun "
                               f"(or slurm)")
        if self.kind == "slurm":
            self.slurm.check()


def launcher_config(data: dict, fail: Callable[[str, str], MiniCPMError]) -> LauncherConfig:
    """The launcher keys of a spec's mapping (launcher, nproc_per_node, slurm); `fail(key, message)` makes the
    spec's one-line error."""
    kind = data.get("launcher", "local")
    if kind not in LAUNCHERS:
        raise fail("launcher", f"expected {' | '.join(LAUNCHERS)}, got {kind!r}")
    nproc = data.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise fail("nproc_per_node", f"expected a positive integer, got {nproc!r}")
    if nproc > 1 and kind == "local":
        raise fail("nproc_per_node", f"{nproc} processes per run need launcher: torchrun (or slurm)")
    slurm = data.get("slurm")
    if slurm is None:
        slurm = {}
    if not isinstance(slurm, dict):
        raise fail("slurm", f"expected a mapping with {', '.join(SLURM_KEYS)}")
    for key, value in slurm.items():
        if key not in SLURM_KEYS:
            raise fail(f"slurm.{key}", f"unknown key (expected {', '.join(SLURM_KEYS)})")
        if key == "partition":
            if not isinstance(value, str) or not value:
                raise fail("slurm.partition", f"expected a partition name, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus" else 1):
            raise fail(f"slurm.{key}", f"expected an integer >= {0 if key == 'gpus' else 1}, got {value!r}")
    return LauncherConfig(kind, nproc, SlurmOptions(**slurm))


def build_launcher(config: LauncherConfig, *, threads: int, folder: str | Path,
                   workers: int = 1) -> Launcher | None:
    """The launcher of `config` (jobs of kind slurm keep submitit's files under `folder`); None for workers=0,
    every job in this process, which only launcher local stands for."""
    config.check()
    if workers == 0:
        if config.kind != "local":
            raise MiniCPMError(f"workers: 0 trains every run in this process, which launcher {config.kind} cannot: "
                               f"give workers >= 1")
        return None
    if config.kind == "torchrun":
        return TorchrunLauncher(config.nproc_per_node, threads)
    if config.kind == "slurm":
        return SlurmLauncher(config.slurm, folder, threads=threads, nproc_per_node=config.nproc_per_node,
                             cluster=config.cluster)
    return LocalLauncher(threads)
