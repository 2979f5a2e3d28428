"""The local launcher: each job a child process of this machine, forked from a fork server that imported the
training library once (a crash or an out-of-memory kill ends that job alone, and no job pays torch's import).

Nothing outlives the launcher: the fork server exits when its launcher dies (each child closes its copy of the
server's "alive" pipe, minicpm.jobs.child.release_fork_server) and every child dies with the fork server (its
parent-death signal), so a SIGKILL of the launcher, or of its whole process group, leaves no job training.
The server is single-threaded, unlike a sweep process whose worker threads hold storage locks.
"""

from __future__ import annotations

from minicpm.jobs.job import Job, failure_line

PRELOAD = ["minicpm.jobs.child", "minicpm.train.loop", "minicpm.train.launch"]
STOP_WAIT_S = 10.0


class LocalLauncher:
    kind = "local"

    def __init__(self, threads: int):
        self.threads = threads
        self._context = None

    def start(self, job: Job) -> "LocalJob":
        from minicpm.jobs.child import run_forked

        if self._context is None:
            import multiprocessing

            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOAD)
        job_file = job.write_file(self.threads)
        job.append_to_log(f"$ {job.command_line()}")
        process = self._context.Process(target=run_forked, args=(str(job_file),), name=f"minicpm-{job.name}")
        process.start()
        return LocalJob(job, process)


class LocalJob:
    """A running local job."""

    def __init__(self, job: Job, process):
        self.job, self.process = job, process

    @property
    def where(self) -> str:
        return f"pid {self.process.pid}"

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.process.exitcode

    def wait(self, timeout: float) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within STOP_WAIT_S."""
        self.process.terminate()
        self.process.join(STOP_WAIT_S)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()

    def failure(self) -> str:
        return failure_line(self.job.log, self.process.exitcode)
