"""A sweep trial as a torchrun job (spec `trial_launcher: torchrun`, `nproc_per_node: N`): each trial is
`torchrun --standalone --nproc_per_node N -m minicpm train CONFIG OVERRIDES --out RUN --resume`, so one trial may
use several GPUs (or gloo CPU processes) while the sweep runs trials side by side.

    python -m minicpm.jobs.torchrun agent N CONFIG OVERRIDES... --out RUN --resume
        the torchrun agent, in-process (torch.distributed.run.main), starting N copies of
    python -m minicpm.jobs.torchrun rank CONFIG OVERRIDES... --out RUN --resume
        one rank: `minicpm train` with the same arguments

Both set Linux's parent-death signal first: a sweep killed with SIGKILL takes its agents down with it, and an
agent its ranks, so no orphan rank keeps a run directory (or a rendezvous port) busy when the sweep is re-run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


MODULE = "minicpm.jobs.torchrun"


class TorchrunTrial:
    """The agent's process, with the parts of multiprocessing.Process the sweep uses (start, join, exitcode,
    terminate, kill), so a torchrun trial is waited on, pruned and ended like a forked one."""

    def __init__(self, config: str, overrides: list[str], run_dir: str, threads: int, nproc_per_node: int,
                 log: Path):
        self.args = [sys.executable, "-m", MODULE, "agent", str(nproc_per_node), config, *overrides,
                     "--out", run_dir, "--resume"]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = log
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab", buffering=0) as log:
            shown = " ".join(self.args[5:])
            log.write(f"$ torchrun --standalone --nproc_per_node {self.args[4]} -m minicpm train {shown}\n".encode())
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env)

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def terminate(self) -> None:
        self.popen.terminate()  # torchrun forwards SIGTERM to its ranks

    def kill(self) -> None:
        self.popen.kill()


def main(argv: list[str]) -> int:
    if sys.platform == "linux":
        from minicpm.sweep.sweep import _die_with_parent

        _die_with_parent()
    role, rest = argv[0], argv[1:]
    if role == "agent":
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", "--nproc_per_node", rest[0], "-m", MODULE, "rank", *rest[1:]])
        return 0
    return train_rank(rest)


def train_rank(args: list[str]) -> int:
    """One rank of a torchrun trial: CONFIG OVERRIDES... --out RUN --resume, trained through the library as a forked
    trial is (sweep.run_trial), a bad value its one `error:` line and exit 2."""
    from minicpm.errors import MiniCPMError
    from minicpm.train.launch import launch_config, split_config_and_overrides
    from minicpm.train.loop import train

    out = args.index("--out")
    run_dir, (config, overrides) = args[out + 1], split_config_and_overrides(args[:out])
    try:
        result = train(launch_config(config, overrides, out=run_dir, resume=True), resume=True)
    except MiniCPMError as e:
        print(f"minicpm train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if result.is_main:
        print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
