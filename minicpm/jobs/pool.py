"""Jobs run `workers` at a time through a launcher: the runs of a scaling campaign and of a schedule comparison.

A job starts once it is ready (a decay branch: once its stable checkpoint exists), so branches start while their
stable run trains on; a job whose `blocked_by` failed never starts. Every job resumes its own run directory, so
killing the pool and starting it again continues where each run stopped.
"""

from __future__ import annotations

import time
from typing import Sequence

from minicpm.errors import MiniCPMError
from minicpm.jobs.job import Job
from minicpm.jobs.launchers import Launcher, RunningJob

POLL_S = 0.5


def never_ready(pending: Sequence[Job]) -> dict[str, str]:
    return {j.name: f"never became ready (after {j.blocked_by or 'nothing'})" for j in pending}


def run_here(jobs: Sequence[Job], echo=print) -> dict[str, str]:
    """Every job one by one in this process (workers=0: for tests and debugging); {name: error} of the failed."""
    pending = list(jobs)
    errors: dict[str, str] = {}
    while pending:
        job = next((j for j in pending if j.ready()), None)
        if job is None:
            return {**errors, **never_ready(pending)}
        pending.remove(job)
        echo(f"{job.name}: training {job.run_dir}")
        try:
            job.run()
        except MiniCPMError as e:
            errors[job.name] = str(e)
            echo(f"{job.name}: failed: {e}")
    return errors


def run_jobs(jobs: Sequence[Job], *, launcher: Launcher | None, workers: int, echo=print) -> dict[str, str]:
    """Run every job, `workers` at a time through `launcher` (None: one by one in this process). Returns
    {job name: error} for the jobs that failed or could not start."""
    if launcher is None:
        return run_here(jobs, echo)
    pending = list(jobs)
    errors: dict[str, str] = {}
    running: dict[str, RunningJob] = {}
    try:
        while pending or running:
            for name, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    errors[name] = process.failure()
                    echo(f"{name}: failed: {errors[name]}")
                else:
                    echo(f"{name}: done")
            for job in [j for j in pending if j.blocked_by in errors]:
                pending.remove(job)
                errors[job.name] = f"not started: {job.blocked_by} failed"
            while len(running) < workers:
                job = next((j for j in pending if j.ready()), None)
                if job is None:
                    break
                pending.remove(job)
                running[job.name] = launcher.start(job)
                echo(f"{job.name}: training {job.run_dir} ({running[job.name].where}; log: {job.log})")
            if pending and not running and not any(j.ready() for j in pending):
                return {**errors, **never_ready(pending)}
            time.sleep(POLL_S)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.stop()
    return errors
