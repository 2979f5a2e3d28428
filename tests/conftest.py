"""Shared pytest fixtures: one thread for tiny models, the command line (in this process, or a real one), prepared
datasets."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one intra-op thread: for tiny models on a shared 2-core machine, OpenMP threads that wait
    for each other cost far more CPU time than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_minicpm(*args, cwd=None, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """`minicpm ARGS...` in a subprocess, as a user runs it (one OpenMP thread, output captured as text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "minicpm", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture
def minicpm():
    """The real command line: minicpm(*args, cwd=...) -> CompletedProcess. For what needs a process of its own
    (signals, kills, torchrun, the environment, a fresh interpreter); everything else uses `cli`."""
    return run_minicpm


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`minicpm ARGS...` as main(ARGS) in this process, in `cwd`, its stdout and stderr captured: the same command
    line without a new interpreter importing torch. An argparse exit (bad usage, --help) is its return code."""
    from minicpm.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["minicpm", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """The command line in this process: cli(*args, cwd=...) -> CompletedProcess, like `minicpm`."""
    return run_cli


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    """(tokenizer.json, code dataset, prose dataset): a 512-token BPE and two small prepared datasets."""
    from train_helpers import make_datasets

    return make_datasets(tmp_path_factory.mktemp("data"))
