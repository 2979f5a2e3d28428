"""`minicpm sweep SPEC --launcher slurm`: submit sweep workers as Slurm jobs through submitit.

Each job runs `minicpm sweep SPEC --out DIR --worker [--storage URL]`; the jobs share the study, so they split the
trials between them (and re-run the trials of a job that was pre-empted). Without --storage the study is
DIR/study.journal, which needs DIR on a filesystem every node mounts (the journal's lock is an O_EXCL file, safe on
NFSv3+). submitit writes its scripts and logs under DIR/slurm/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from minicpm.errors import MiniCPMError


@dataclass
class SlurmOptions:
    jobs: int = 1
    partition: str | None = None
    gpus: int = 0
    time: int = 60
    nodes: int = 1
    cpus: int | None = None

    def check(self) -> None:
        for name in ("jobs", "time", "nodes"):
            if getattr(self, name) < 1:
                raise MiniCPMError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.gpus < 0:
            raise MiniCPMError(f"--gpus must be >= 0, got {self.gpus}")
        if self.cpus is not None and self.cpus < 1:
            raise MiniCPMError(f"--cpus must be positive, got {self.cpus}")


def worker_command(spec: str | Path, out: str | Path, storage: str | None) -> list[str]:
    command = [sys.executable, "-m", "minicpm", "sweep", str(Path(spec).resolve()), "--out", str(Path(out).resolve()),
               "--worker"]
    return command + (["--storage", storage] if storage else [])


def executor_parameters(options: SlurmOptions, name: str) -> dict:
    """submitit's generic parameters (and slurm_-prefixed ones) for one worker job."""
    parameters = dict(name=name, timeout_min=options.time, nodes=options.nodes, tasks_per_node=1,
                      gpus_per_node=options.gpus, slurm_array_parallelism=options.jobs)
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.cpus:
        parameters["cpus_per_task"] = options.cpus
    return parameters


def sbatch_script(spec: str | Path, out: str | Path, options: SlurmOptions, *, storage: str | None = None) -> str:
    """The sbatch script of one worker job, as submitit writes it (what --dry-run prints; needs no Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from minicpm.sweep.spec import load_spec

    options.check()
    return _make_sbatch_string(command=" ".join(worker_command(spec, out, storage)), folder=Path(out) / "slurm" / "%j",
                               job_name=load_spec(spec).name, partition=options.partition, time=options.time,
                               nodes=options.nodes, ntasks_per_node=1, cpus_per_task=options.cpus,
                               gpus_per_node=options.gpus or None)


def submit_workers(spec: str | Path, out: str | Path, options: SlurmOptions, *, storage: str | None = None,
                   cluster: str | None = "slurm") -> list:
    """Submit options.jobs worker jobs (submitit Jobs; cluster="local" runs them as processes here)."""
    import submitit

    from minicpm.sweep.sweep import check_space_keys
    from minicpm.sweep.spec import load_spec

    options.check()
    spec_data = load_spec(spec)
    check_space_keys(spec_data)
    try:
        executor = submitit.AutoExecutor(folder=Path(out) / "slurm" / "%j", cluster=cluster)
    except RuntimeError as e:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise MiniCPMError(f"--launcher slurm: {str(e).splitlines()[0]} (--dry-run prints the job script)") from None
    executor.update_parameters(**executor_parameters(options, spec_data.name))
    command = submitit.helpers.CommandFunction(worker_command(spec, out, storage), verbose=True)
    try:
        with executor.batch():
            jobs = [executor.submit(command) for _ in range(options.jobs)]
    except RuntimeError as e:  # sbatch refused the jobs
        raise MiniCPMError(f"--launcher slurm: {str(e).splitlines()[0]}") from None
    return jobs
