"""The job engine (minicpm/jobs): a job's file read back by its child, the one-line reason a job failed, the pool's
order (a job blocked by a failed one never starts), the launcher keys, and jobs that end with their launcher when
it is killed with SIGKILL (alone, or with its process group), locally and as torchrun jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_helpers import left_running, processes_in, wait_for

from minicpm.errors import MiniCPMError
from minicpm.jobs.job import Job, failure_line, read_job_file, train_recipe
from minicpm.jobs.launchers import LauncherConfig, build_launcher, launcher_config
from minicpm.jobs.pool import run_jobs
from minicpm.rundir import RunDir
from minicpm.scaling.decay import branch_decay


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, datasets):
    """(a 4-step recipe, an endless one): tiny models on the code dataset."""
    root = tmp_path_factory.mktemp("jobs")
    tokenizer, code, _ = datasets
    paths = []
    for name, steps in (("short", 4), ("endless", 1_000_000)):
        path = root / f"{name}.yaml"
        path.write_text(f"""
model: {{preset: tiny}}
data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}, eval_sequences: 2}}
schedule: {{kind: constant, total_steps: {steps}, warmup_steps: 1}}
batch: {{tokens_per_step: 256, seq_len: 32, micro_batch_size: 4}}
run: {{log_every: 2, eval_every: 0, checkpoint_every: 4, progress: false, device: cpu, dtype: fp32}}
""")
        paths.append(path)
    return paths


def training(name: str, recipe: Path, out: Path, *overrides: str) -> Job:
    return Job(name, out / name, {"config": str(recipe), "overrides": list(overrides), "run_dir": str(out / name)})


# ---------------------------------------------------------------- jobs and their files

def test_a_job_file_names_its_work_and_its_arguments_for_the_child(tmp_path):
    job = Job("w16/decay-2N", tmp_path / "run", {"source": tmp_path / "src", "decay_steps": 3,
                                                  "out": str(tmp_path / "run")}, work=branch_decay)
    read = read_job_file(job.write_file(threads=3))
    assert read.work is branch_decay and read.threads == 3
    assert read.kwargs == {"source": str(tmp_path / "src"), "decay_steps": 3, "out": str(tmp_path / "run")}
    assert read.log == (tmp_path / "run" / "job.log").resolve()


def test_work_a_child_could_not_import_is_refused(tmp_path):
    with pytest.raises(ValueError, match="module-level function"):
        Job("x", tmp_path, work=lambda: None)


def test_a_training_job_shows_as_the_command_a_person_would_type(tmp_path):
    job = training("t", Path("r.yaml"), Path("out"), "optim.lr=0.01")
    assert job.work is train_recipe
    assert job.command_line() == "minicpm train r.yaml optim.lr=0.01 --out out/t --resume"
    assert job.command_line(2).startswith("torchrun --standalone --nproc_per_node 2 -m minicpm train r.yaml")


@pytest.mark.parametrize("log, code, line", [
    ("step 1\nminicpm train: error: optim.lr must be positive, got -1.0\n", 2, "optim.lr must be positive, got -1.0"),
    ("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n", 1, "RuntimeError: boom"),
    ("step 4\n", -signal.SIGKILL, "killed by SIGKILL (out of memory?)"),
    ("minicpm train: error: bad value\nTraceback:\n  torch ...\nChildFailedError:\n=======\n", 1, "bad value"),
    ("", 3, "exit status 3"),
])
def test_a_failed_job_is_one_line(tmp_path, log, code, line):
    path = tmp_path / "job.log"
    path.write_text(log)
    assert failure_line(path, code) == line


# ---------------------------------------------------------------- launcher keys

def spec_error(key: str, message: str) -> MiniCPMError:
    return MiniCPMError(f"spec.yaml: {key}: {message}")


@pytest.mark.parametrize("data, message", [
    ({"launcher": "mpirun"}, "launcher: expected local | torchrun | slurm, got 'mpirun'"),
    ({"launcher": "torchrun", "nproc_per_node": 0}, "nproc_per_node: expected a positive integer, got 0"),
    ({"nproc_per_node": 4}, "nproc_per_node: 4 processes per run need launcher: torchrun"),
    ({"launcher": "slurm", "slurm": {"nodes": 2}}, "slurm.nodes: unknown key"),
    ({"launcher": "slurm", "slurm": {"gpus": -1}}, "slurm.gpus: expected an integer >= 0, got -1"),
    ({"launcher": "slurm", "slurm": {"partition": ""}}, "slurm.partition: expected a partition name"),
])
def test_bad_launcher_keys_name_the_key(data, message):
    with pytest.raises(MiniCPMError, match=message):
        launcher_config(data, spec_error)


def test_command_line_values_go_over_the_specs():
    spec = launcher_config({"launcher": "slurm", "slurm": {"partition": "gpu", "gpus": 1}}, spec_error)
    config = spec.updated(kind=None, nproc_per_node=2, partition=None, gpus=4, time=None, cpus=None)
    assert (config.kind, config.nproc_per_node, config.slurm.partition, config.slurm.gpus) == ("slurm", 2, "gpu", 4)
    with pytest.raises(MiniCPMError, match="nproc_per_node: 2 processes per run need launcher: torchrun"):
        spec.updated(kind="local", nproc_per_node=2)


def test_workers_0_trains_in_this_process_only_with_the_local_launcher(tmp_path):
    assert build_launcher(LauncherConfig(), threads=1, folder=tmp_path, workers=0) is None
    with pytest.raises(MiniCPMError, match="workers: 0 .* launcher torchrun cannot"):
        build_launcher(LauncherConfig("torchrun", 2), threads=1, folder=tmp_path, workers=0)


# ---------------------------------------------------------------- the pool

@pytest.mark.slow
def test_the_pool_reports_a_failed_job_in_one_line_and_never_starts_what_it_blocks(recipes, tmp_path):
    short, _ = recipes
    bad = training("bad", short, tmp_path, "optim.lr=-1.0")
    good = training("good", short, tmp_path)
    source = RunDir(bad.run_dir).checkpoint_dir(4)
    branch = Job("branch", tmp_path / "branch", {"source": str(source), "decay_steps": 2,
                                                  "out": str(tmp_path / "branch")},
                 work=branch_decay, ready=source.is_dir, blocked_by="bad")
    lines = []
    errors = run_jobs([branch, bad, good], launcher=build_launcher(LauncherConfig(), threads=1, folder=tmp_path),
                      workers=2, echo=lines.append)
    assert errors == {"bad": "optim.lr must be positive, got -1.0", "branch": "not started: bad failed"}
    assert "good: done" in lines and not (tmp_path / "branch").exists()
    assert RunDir(good.run_dir).latest_checkpoint().name == "step_00000004"
    assert (good.run_dir / "job.log").read_text().startswith(f"$ minicpm train {short} --out {good.run_dir} --resume")


# ---------------------------------------------------------------- jobs die with their launcher

LAUNCHER = """
import sys, time
from pathlib import Path
from minicpm.jobs.job import Job
from minicpm.jobs.launchers import LauncherConfig, build_launcher
kind, nproc, jobs, recipe, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
launcher = build_launcher(LauncherConfig(kind, nproc), threads=1, folder=out)
for i in range(jobs):
    run_dir = out / f"job{i}"
    launcher.start(Job(f"job{i}", run_dir, {"config": recipe, "overrides": [], "run_dir": str(run_dir)}))
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, nproc, jobs, whom", [
    ("local", 1, 2, "the launcher"),  # its process group: tests/scaling/test_campaign.py kills a campaign's
    ("torchrun", 2, 1, "the launcher"),
    ("torchrun", 2, 1, "its process group"),
])
def test_running_jobs_end_with_their_launcher_killed_by_sigkill(recipes, tmp_path, kind, nproc, jobs, whom):
    _, endless = recipes
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, kind, str(nproc), str(jobs), str(endless), "out"],
                                cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = [tmp_path / f"out/job{i}/metrics.jsonl" for i in range(jobs)]
    try:
        wait_for(lambda: all(m.is_file() and m.stat().st_size for m in metrics), 180, "the jobs never trained")
        running = processes_in(tmp_path)
        assert len(running) >= 1 + jobs * nproc, running  # the launcher, and every rank of every job
    finally:
        if whom == "the launcher":
            launcher.kill()
        else:
            os.killpg(launcher.pid, signal.SIGKILL)  # torchrun's ranks, in sessions of their own, are not in it
        launcher.wait()
    left = left_running(tmp_path, timeout=15)
    assert not left, f"still running after {whom} was killed: {left}"
    sizes = [m.stat().st_size for m in metrics]
    time.sleep(1.0)
    assert [m.stat().st_size for m in metrics] == sizes  # nothing writes the run directories any more
