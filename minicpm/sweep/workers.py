"""`minicpm sweep SPEC --launcher slurm`: sweep workers as Slurm jobs, submitted through submitit
(minicpm.jobs.slurm).

Each job runs `minicpm sweep SPEC --out DIR --worker [--storage URL]`; the jobs share the study, so they split the
trials between them (and re-run the trials of a job that was pre-empted), each training its trials through its own
launcher (the spec's trial_launcher). Without --storage the study is DIR/study.journal, which needs DIR on a
filesystem every node mounts (the journal's lock is an O_EXCL file, safe on NFSv3+). submitit writes its scripts
and logs under DIR/slurm/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.jobs.slurm import SlurmOptions, run_command, sbatch_script, slurm_executor
from minicpm.sweep.spec import load_spec
from minicpm.sweep.sweep import check_space_keys


def worker_command(spec: str | Path, out: str | Path, storage: str | None) -> list[str]:
    command = [sys.executable, "-m", "minicpm", "sweep", str(Path(spec).resolve()), "--out", str(Path(out).resolve()),
               "--worker"]
    return command + (["--storage", storage] if storage else [])


def worker_script(spec: str | Path, out: str | Path, options: SlurmOptions, *, storage: str | None = None) -> str:
    """The sbatch script of one worker job (what --dry-run prints; needs no Slurm)."""
    return sbatch_script(worker_command(spec, out, storage), Path(out) / "slurm", options, load_spec(spec).name)


def submit_workers(spec: str | Path, out: str | Path, options: SlurmOptions, *, jobs: int = 1,
                   storage: str | None = None, cluster: str | None = "slurm") -> list:
    """Submit `jobs` worker jobs (submitit Jobs whose result is the worker's exit status; cluster="local" runs them
    as processes here)."""
    if jobs < 1:
        raise MiniCPMError(f"--jobs must be positive, got {jobs}")
    spec_data = load_spec(spec)
    check_space_keys(spec_data)
    executor = slurm_executor(Path(out) / "slurm", options, spec_data.name, cluster=cluster)
    executor.update_parameters(slurm_array_parallelism=jobs)
    try:
        with executor.batch():
            submitted = [executor.submit(run_command, worker_command(spec, out, storage)) for _ in range(jobs)]
    except RuntimeError as e:  # sbatch refused the jobs
        raise MiniCPMError(f"--launcher slurm: {str(e).splitlines()[0]}") from None
    return submitted
