"""Training runs in parallel, each in its own process, with the sweep engine's machinery (a fork server that
imported the library once, children that die with their parent, the failing run's one-line error): the worker
pool of a scaling campaign and of a schedule comparison.

A run waits until what it needs exists (a decay branch: its stable checkpoint), so branches start while their
stable run trains on. Every run resumes its own run directory, so killing the pool and starting it again
continues where each run stopped.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from minicpm.errors import MiniCPMError
from minicpm.sweep.sweep import POLL_S, TRIAL_LOG, _context, _die_with_parent, _end, _failure_line


@dataclass
class Job:
    """One training run: `kind` (stable | branch | run) with its arguments (see run_job), into run_dir."""

    name: str
    kind: str
    run_dir: Path
    args: dict = field(default_factory=dict)
    ready: Callable[[], bool] = lambda: True
    """Whether it can start now (a branch: its source checkpoint exists)."""
    blocked_by: str | None = None
    """The job whose failure means this one can never start."""


def run_job(kind: str, run_dir: str, args: dict) -> None:
    """Train one job to its end in this process (resuming its run directory)."""
    from minicpm.scaling.decay import branch_decay
    from minicpm.train.launch import launch_config
    from minicpm.train.loop import train

    if kind == "stable":
        # the stable phase in stages: each stage ends on a checkpoint (and an eval) at the next step asked for;
        # a constant schedule does not depend on its length, so the stages train exactly one uninterrupted run
        from minicpm.rundir import RunDir, is_complete

        for step in args["stages"]:
            if is_complete(RunDir(run_dir).checkpoint_dir(step)):
                continue
            cfg = launch_config(args["config"], [*args["overrides"], f"schedule.total_steps={step}"],
                                out=run_dir, resume=True)
            train(cfg, resume=True)
    elif kind == "branch":
        branch_decay(args["source"], args["decay_steps"], run_dir, overrides=args["overrides"],
                     decay=args["decay"], half_life=args["half_life"])
    elif kind == "run":
        train(launch_config(args["config"], args["overrides"], out=run_dir, resume=True), resume=True)
    else:
        raise MiniCPMError(f"unknown job kind {kind!r}")


def _child(kind: str, run_dir: str, args: dict, threads: int) -> None:
    """A job in its own process, its output appended to RUN/run.log (the sweep's trial.log)."""
    if sys.platform == "linux":
        _die_with_parent()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(run_dir) / TRIAL_LOG, "ab", buffering=0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch

    torch.set_num_threads(threads)
    try:
        run_job(kind, run_dir, args)
    except MiniCPMError as e:
        print(f"minicpm train: error: {e}", flush=True)
        os._exit(2)
    except KeyboardInterrupt:
        os._exit(130)
    sys.stdout.flush()
    sys.stderr.flush()


def run_jobs(jobs: Sequence[Job], *, workers: int, threads: int, echo=print) -> dict[str, str]:
    """Run every job, `workers` at a time in child processes (workers=0: one by one in this process, for tests);
    a job starts once it is ready. Returns {job name: error} for the jobs that failed or could not start."""
    pending = list(jobs)
    errors: dict[str, str] = {}
    if workers == 0:
        while pending:
            job = next((j for j in pending if j.ready()), None)
            if job is None:
                for j in pending:
                    errors[j.name] = f"never became ready (after {j.blocked_by or 'nothing'})"
                return errors
            pending.remove(job)
            echo(f"{job.name}: training {job.run_dir}")
            try:
                run_job(job.kind, str(job.run_dir), job.args)
            except MiniCPMError as e:
                errors[job.name] = str(e)
                echo(f"{job.name}: failed: {e}")
        return errors
    context = _context()
    running: dict[str, tuple[Job, object]] = {}
    try:
        while pending or running:
            for name, (job, process) in list(running.items()):
                if process.exitcode is None:
                    continue
                del running[name]
                if process.exitcode != 0:
                    errors[name] = _failure_line(job.run_dir / TRIAL_LOG, process.exitcode)
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
                job.run_dir.mkdir(parents=True, exist_ok=True)
                process = context.Process(target=_child, name=f"minicpm-{job.name}",
                                          args=(job.kind, str(job.run_dir), job.args, threads))
                process.start()
                running[job.name] = (job, process)
                echo(f"{job.name}: training {job.run_dir} (log: {job.run_dir / TRIAL_LOG})")
            if pending and not running and not any(j.ready() for j in pending):
                for j in pending:
                    errors[j.name] = f"never became ready (after {j.blocked_by or 'nothing'})"
                return errors
            time.sleep(POLL_S)
    finally:
        for _, process in running.values():
            if process.exitcode is None:
                _end(process)
    return errors
