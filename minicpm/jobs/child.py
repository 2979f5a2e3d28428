"""The one entry point of every job's process: a local child forked from the fork server, each rank of a torchrun
job, and the process a Slurm job starts all run RUN/job.json here.

    python -m minicpm.jobs.child RUN/job.json [--parent PID]

It first ties its life to its parent's (no orphan keeps writing a run directory, or holding its lock, after the
launcher is killed), then appends its output to RUN/job.log and runs the job's work. Exit status: 0 done, 2 a
MiniCPMError (its one line in the log as `minicpm train: error: ...`), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys

from minicpm.errors import MiniCPMError
from minicpm.jobs.job import read_job_file

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when its parent dies. `parent`: the pid the parent had when it started this
    one; if it is already gone (it died before the signal was armed) this process ends now."""
    if sys.platform != "linux":
        return  # macOS and others have no parent-death signal: a killed launcher leaves its jobs to run out
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def release_fork_server() -> None:
    """Close this process's copy of the fork server's "alive" pipe. The fork server exits when every copy of that
    pipe is closed, and multiprocessing hands one to each child it forks (so that children may fork through it
    too): with children holding theirs, a launcher killed with SIGKILL left the server, and through it every
    running job, alive and training. Closed, the server ends with the launcher and its children with it (their
    parent-death signal). Harmless in a process that no fork server started."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None


def run_job_file(job_file: str, *, parent: int | None = None) -> int:
    """Run RUN/job.json in this process (a job's child process); returns the exit status."""
    die_with_parent(parent)  # first: the fork server cannot exit while this process still holds its pipe
    release_fork_server()
    job = read_job_file(job_file)
    log = open(job.log, "ab", buffering=0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch

    torch.set_num_threads(job.threads)
    try:
        result = job.work(**job.kwargs)
    except MiniCPMError as e:
        print(f"minicpm train: error: {e}", flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    if hasattr(result, "summary") and getattr(result, "is_main", True):
        print(result.summary(), flush=True)
    return 0


def run_forked(job_file: str) -> None:
    """The target of a local child (forked from the fork server, whose pid needs no check: it cannot have exited)."""
    code = run_job_file(job_file)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)  # multiprocessing would report any return as exit status 0


def main(argv: list[str]) -> int:
    job_file, rest = argv[0], argv[1:]
    parent = int(rest[rest.index("--parent") + 1]) if "--parent" in rest else None
    return run_job_file(job_file, parent=parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
