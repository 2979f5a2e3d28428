"""Processes seen through /proc, for the tests that kill a launcher: what is still running inside a directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for its parent to read its status)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def processes_in(directory: str | Path) -> dict[int, str]:
    """{pid: command line} of every live process but this one whose working directory lies inside `directory` or
    whose command line names it (a launcher's children, fork server and torchrun agents all start there)."""
    root = str(Path(directory).resolve())
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile, or another user's
            continue
        if (cwd == root or cwd.startswith(root + os.sep) or root in command) and alive(int(entry.name)):
            found[int(entry.name)] = command
    return found


def left_running(directory: str | Path, timeout: float) -> dict[int, str]:
    """The processes in `directory` still running after up to `timeout` seconds (killed, so the test leaves none)."""
    deadline = time.time() + timeout
    left = processes_in(directory)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = processes_in(directory)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)
