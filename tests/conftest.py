"""Shared pytest fixtures: one thread for tiny models, the real command line, prepared datasets."""

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
    """The real command line: minicpm(*args, cwd=...) -> CompletedProcess."""
    return run_minicpm


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    """(tokenizer.json, code dataset, prose dataset): a 512-token BPE and two small prepared datasets."""
    from train_helpers import make_datasets

    return make_datasets(tmp_path_factory.mktemp("data"))
