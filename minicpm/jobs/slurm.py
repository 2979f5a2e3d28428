"""The Slurm launcher: each job a Slurm job submitted through submitit, running the job's child process
(`python -m minicpm.jobs.child RUN/job.json`, or a torchrun agent of N of them with nproc_per_node N) on one node.

The launcher waits on its jobs as the local one does, so a campaign's decays are submitted as soon as their stable
checkpoint exists. Run directories must lie on a filesystem every node mounts; submitit writes its scripts and logs
under FOLDER/%j (a campaign's DIR/slurm/). Interrupted (Ctrl-C), the launcher cancels the jobs it submitted;
killed with SIGKILL, it leaves them to Slurm (`scancel --name minicpm-...`), and a re-run finds each run directory
locked until its job ends.

Also what `minicpm sweep --launcher slurm` submits its workers with (minicpm.sweep.workers).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.jobs.job import Job, failure_line

SLURM_KEYS = ("partition", "gpus", "time", "cpus")
"""The options a spec's `slurm:` mapping may set (nodes is the sweep workers' alone: a run is one node)."""


@dataclass
class SlurmOptions:
    partition: str | None = None
    """Slurm partition (default: the cluster's)."""
    gpus: int = 0
    """GPUs per node."""
    time: int = 60
    """Time limit of each job in minutes."""
    nodes: int = 1
    """Nodes per job."""
    cpus: int | None = None
    """CPUs per task (default: Slurm's)."""

    def check(self) -> None:
        for name in ("time", "nodes"):
            if getattr(self, name) < 1:
                raise MiniCPMError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.gpus < 0:
            raise MiniCPMError(f"--gpus must be >= 0, got {self.gpus}")
        if self.cpus is not None and self.cpus < 1:
            raise MiniCPMError(f"--cpus must be positive, got {self.cpus}")


def executor_parameters(options: SlurmOptions, name: str) -> dict:
    """submitit's generic parameters (and slurm_-prefixed ones) for one job."""
    parameters = dict(name=name, timeout_min=options.time, nodes=options.nodes, tasks_per_node=1,
                      gpus_per_node=options.gpus)
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.cpus:
        parameters["cpus_per_task"] = options.cpus
    return parameters


def slurm_executor(folder: str | Path, options: SlurmOptions, name: str, *, cluster: str | None = "slurm"):
    """A submitit executor (cluster="local": its local executor, which runs the jobs as processes here)."""
    import submitit

    options.check()
    try:
        executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
    except RuntimeError as e:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise MiniCPMError(f"--launcher slurm: {str(e).splitlines()[0]}") from None
    executor.update_parameters(**executor_parameters(options, name))
    return executor


def sbatch_script(command: list[str], folder: str | Path, options: SlurmOptions, name: str) -> str:
    """The sbatch script of a job running `command`, as submitit writes it (what --dry-run prints; needs no Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string

    options.check()
    return _make_sbatch_string(command=" ".join(command), folder=Path(folder) / "%j", job_name=name,
                               partition=options.partition, time=options.time, nodes=options.nodes,
                               ntasks_per_node=1, cpus_per_task=options.cpus, gpus_per_node=options.gpus or None)


def run_command(command: list[str]) -> int:
    """What a Slurm job runs: `command`, its exit status returned (the child writes its own log)."""
    return subprocess.run(command, stdin=subprocess.DEVNULL).returncode


def job_command(job_file: str, nproc_per_node: int) -> list[str]:
    if nproc_per_node > 1:
        from minicpm.jobs.torchrun import agent_command

        return agent_command(nproc_per_node, job_file)
    return [sys.executable, "-m", "minicpm.jobs.child", job_file]


class SlurmLauncher:
    kind = "slurm"

    def __init__(self, options: SlurmOptions, folder: str | Path, *, threads: int, nproc_per_node: int = 1,
                 cluster: str | None = "slurm"):
        if options.nodes != 1:
            raise MiniCPMError(f"--nodes {options.nodes}: a run is one Slurm job on one node (torchrun --standalone)")
        self.options, self.threads, self.nproc_per_node = options, threads, nproc_per_node
        self.executor = slurm_executor(folder, options, "minicpm", cluster=cluster)

    def start(self, job: Job) -> "SlurmJob":
        job_file = job.write_file(self.threads)
        job.append_to_log(f"$ {job.command_line(self.nproc_per_node)}")
        self.executor.update_parameters(name=f"minicpm-{job.name.replace('/', '-')}")
        try:
            submitted = self.executor.submit(run_command, job_command(str(job_file), self.nproc_per_node))
        except RuntimeError as e:  # sbatch refused the job
            raise MiniCPMError(f"--launcher slurm: {job.name}: {str(e).splitlines()[0]}") from None
        return SlurmJob(job, submitted)


class SlurmJob:
    """A submitted Slurm job (a submitit Job)."""

    def __init__(self, job: Job, submitted):
        self.job, self.submitted = job, submitted
        self.returncode: int | None = None
        self.ended_as: str | None = None
        """What Slurm says ended a job that never returned (CANCELLED, TIMEOUT, NODE_FAIL ...)."""

    @property
    def where(self) -> str:
        return f"slurm job {self.submitted.job_id}"

    def poll(self) -> int | None:
        if self.returncode is None and self.submitted.done():
            try:
                self.returncode = self.submitted.result()
            except Exception as e:  # submitit's UncompletedJobError / FailedJobError: Slurm ended it
                self.returncode = 1
                self.ended_as = f"slurm job {self.submitted.job_id}: {self.submitted.state}: " \
                                f"{(str(e).strip().splitlines() or [''])[0]}"
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        import time

        if self.poll() is None:
            time.sleep(timeout)
        return self.poll()

    def stop(self) -> None:
        self.submitted.cancel(check=False)

    def failure(self) -> str:
        return self.ended_as or failure_line(self.job.log, self.returncode)
