"""The torchrun launcher: each job `torchrun --standalone --nproc_per_node N` of the job's child process, so one job
may use several GPUs (or gloo CPU processes) while others run beside it.

    python -m minicpm.jobs.torchrun N RUN/job.json [--parent PID]
        the torchrun agent, in-process (torch.distributed.run.main), starting N ranks of
    python -m minicpm.jobs.child RUN/job.json --parent AGENT_PID

The agent and each rank set Linux's parent-death signal first: a launcher killed with SIGKILL takes its agents down
with it, and an agent its ranks (which torchrun starts in sessions of their own, out of reach of a process-group
kill), so no orphan rank keeps a run directory (or a rendezvous port) busy when the launcher is re-run.
"""

from __future__ import annotations

import os
import subprocess
import sys

from minicpm.jobs.child import die_with_parent
from minicpm.jobs.job import Job, failure_line

MODULE = "minicpm.jobs.torchrun"
STOP_WAIT_S = 10.0


def agent_command(nproc_per_node: int, job_file: str, parent: int | None = None) -> list[str]:
    command = [sys.executable, "-m", MODULE, str(nproc_per_node), job_file]
    return command + (["--parent", str(parent)] if parent is not None else [])


class TorchrunLauncher:
    kind = "torchrun"

    def __init__(self, nproc_per_node: int, threads: int):
        self.nproc_per_node, self.threads = nproc_per_node, threads

    def start(self, job: Job) -> "TorchrunJob":
        job_file = job.write_file(self.threads)
        job.append_to_log(f"$ {job.command_line(self.nproc_per_node)}")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        # the agent's parent-death signal follows the thread that starts it (a sweep's worker thread), which
        # waits for it to end
        with open(job.log, "ab", buffering=0) as log:
            popen = subprocess.Popen(agent_command(self.nproc_per_node, str(job_file), os.getpid()), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return TorchrunJob(job, popen)


class TorchrunJob:
    """A running torchrun job (its agent's process)."""

    def __init__(self, job: Job, popen: subprocess.Popen):
        self.job, self.popen = job, popen

    @property
    def where(self) -> str:
        return f"torchrun agent pid {self.popen.pid}"

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        self.popen.terminate()  # torchrun forwards SIGTERM to its ranks
        try:
            self.popen.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def failure(self) -> str:
        return failure_line(self.job.log, self.popen.returncode)


def main(argv: list[str]) -> int:
    nproc, job_file, rest = argv[0], argv[1], argv[2:]
    die_with_parent(int(rest[rest.index("--parent") + 1]) if "--parent" in rest else None)
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", "--nproc_per_node", nproc, "-m", "minicpm.jobs.child", job_file,
              "--parent", str(os.getpid())])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
