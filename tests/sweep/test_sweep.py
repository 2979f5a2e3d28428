"""`minicpm sweep`: specs, failing trials, a sweep killed mid-way and resumed, samplers with a pruner, two workers
on one study in a real PostgreSQL server (started here, in a temporary directory, on a loopback port), and the
Slurm launcher (its job script, and its jobs run here by submitit's local executor)."""

import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import make_datasets

from minicpm.cli import main
from minicpm.sweep.sweep import read_trials_csv

GRID = [0.002, 0.004, -1.0, 0.008, 0.016, 0.032]  # -1.0 fails the trainer's validation


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tokenizer, code, _ = make_datasets(root / "data")
    path = root / "tiny.yaml"
    path.write_text(f"""
model: {{preset: tiny}}
data: {{stable: {{{code}: 1.0}}, tokenizer: {tokenizer}, eval_sequences: 2}}
schedule: {{kind: constant, total_steps: 4, warmup_steps: 1}}
batch: {{tokens_per_step: 128, seq_len: 32, micro_batch_size: 4}}
run: {{log_every: 2, eval_every: 2, checkpoint_every: 2, progress: false, device: cpu, dtype: fp32}}
""")
    return path


def write_spec(directory, recipe, text):
    spec = Path(directory) / "spec.yaml"
    spec.write_text(f"base: {{config: {recipe}}}\n{text}")
    return spec


def sweep_command(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "minicpm", "sweep", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(rows):
    return {float(r["optim.lr"]): (r["state"], r["eval_loss"], r["error"]) for r in rows}


@pytest.fixture(scope="module")
def grid_sweep(recipe):
    """The uninterrupted reference: a 6-point grid, 2 trials at a time."""
    out = recipe.parent / "reference"
    spec = write_spec(recipe.parent, recipe, f"space: {{optim.lr: {GRID}}}\nsampler: grid\nworkers: 2\n")
    process = sweep_command(spec, "--out", out)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return spec, out, read_trials_csv(out / "trials.csv"), output


@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_message_and_the_others_finish(grid_sweep):
    _, out, rows, output = grid_sweep
    assert [r["number"] for r in rows] == [str(n) for n in range(6)]
    by_lr = finished(rows)
    assert by_lr[-1.0] == ("failed", "", "optim.lr must be positive, got -1.0")
    assert all(state == "complete" for lr, (state, _, _) in by_lr.items() if lr != -1.0)
    for row in rows:
        assert Path(row["run_dir"]).parent == out / "runs"
        if row["state"] == "complete":  # the metric is the run's last eval_loss
            records = [line for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()
                       if "eval_loss" in line]
            assert f'"eval_loss": {row["eval_loss"]}' in records[-1]
    assert "best: trial" in output and "failed: trial 2: optim.lr must be positive" in output


@pytest.mark.slow
def test_a_sweep_killed_mid_way_resumes_to_the_same_results(grid_sweep):
    spec, reference, reference_rows, _ = grid_sweep
    out = reference.parent / "killed"
    process = sweep_command(spec, "--out", out, "--workers", "1")
    trial_pid = None
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the second or third trial to be training
        done = read_trials_csv(out / "trials.csv") if (out / "trials.csv").is_file() else []
        owners = sorted((out / "runs").glob("*/.lock.owner")) if len(done) >= 2 else []
        if owners:
            trial_pid = int(owners[-1].read_text().split()[1])
            break
        time.sleep(0.2)
    assert trial_pid, "no trial started"
    process.send_signal(signal.SIGKILL)  # the sweep first: alive, it would record the trial's death as a failure
    process.wait()
    try:
        os.kill(trial_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already ended with its parent (the trial dies with the sweep's fork server)
    interrupted = read_trials_csv(out / "trials.csv")
    assert len(interrupted) < 6

    again = sweep_command(spec, "--out", out, "--workers", "2")
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert "re-running interrupted trial" in output
    rows = read_trials_csv(out / "trials.csv")
    assert len(rows) == 6 and {r["state"] for r in rows} == {"complete", "failed"}
    assert finished(rows) == finished(reference_rows)  # the same losses, to the last bit
    # and the same table: a retry is listed under the number of the trial it replaces, in its run directory
    assert [(r["number"], r["optim.lr"], Path(r["run_dir"]).name) for r in rows] == \
        [(r["number"], r["optim.lr"], Path(r["run_dir"]).name) for r in reference_rows]
    again = sweep_command(spec, "--out", out)  # a finished sweep runs nothing more
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "trial " not in output.split("sweep ")[0], output
    assert read_trials_csv(out / "trials.csv") == rows


@pytest.mark.slow
def test_random_sampler_with_a_median_pruner_on_reported_evaluations(recipe, tmp_path):
    spec = write_spec(tmp_path, recipe, """
space:
  optim.lr: {low: 1.0e-3, high: 1.0e-1, log: true}
  schedule.warmup_steps: {low: 1, high: 3}
sampler: random
trials: 4
workers: 1
seed: 3
pruner: {kind: median, n_startup_trials: 1}
""")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 0
    rows = read_trials_csv(tmp_path / "out/trials.csv")
    assert len(rows) == 4 and {r["state"] for r in rows} <= {"complete", "pruned"}
    for row in rows:
        assert 1e-3 <= float(row["optim.lr"]) <= 1e-1 and row["schedule.warmup_steps"] in {"1", "2", "3"}
    import optuna

    study = optuna.load_study(study_name="spec", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "out/study.journal"))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:  # the evaluations at steps 2 and 4 reached the pruner
        assert sorted(t.intermediate_values) == [2, 4] and t.intermediate_values[4] == t.value
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:  # pruned: worse than the median of the earlier trials
            step = max(t.intermediate_values)
            earlier = [c.intermediate_values[step] for c in complete if c.number < t.number]
            assert earlier and t.intermediate_values[step] > min(earlier)
    assert len({round(math.log(float(r["optim.lr"])), 9) for r in rows}) == 4


@pytest.mark.parametrize("text, message", [
    ("space: {optim.lr: [0.01]}\nsamplr: grid\n", "samplr: unknown key"),
    ("space: {}\n", "space: expected dotted config keys, each with a list of choices"),
    ("space: {optim.lr: []}\n", "space.optim.lr: expected a non-empty list of choices, got []"),
    ("space: {optim.lr: {low: 0.1, high: 0.01}}\n", "space.optim.lr: low 0.1 > high 0.01"),
    ("space: {optim.lr: {low: 0, high: 0.01, log: true}}\n", "space.optim.lr: log scale needs low > 0"),
    ("space: {optim.lr: [0.01]}\nsampler: bayes\n", "sampler: expected grid | random | tpe, got 'bayes'"),
    ("space: {optim.lr: {low: 0.001, high: 0.01}}\nsampler: grid\n", "space.optim.lr: the grid sampler needs"),
    ("space: {optim.lrr: [0.01]}\n", "space.optim.lrr: override 'optim.lrr=0.01'"),
    ("space: {optim.lr: [0.01]}\ntrials: 0\n", "trials: expected a positive integer"),
    ("space: {batch.tokens_per_step+schedule.total_steps: [[128, 4], [64]]}\n",
     "space.batch.tokens_per_step+schedule.total_steps: choice [64] is not a list of 2 values"),
    ("space: {batch.tokens_per_step+schedule.total_steps: [128, 4]}\n",
     "space.batch.tokens_per_step+schedule.total_steps: choice 128 is not a list of 2 values"),
    ("space: {optim.lr+optim.lr: [[0.1, 0.2]]}\n", "space.optim.lr+optim.lr: a key is named twice"),
    ("space: {batch.tokens_per_step+schedule.total_stepz: [[128, 4]]}\n",
     "space.batch.tokens_per_step+schedule.total_stepz: override 'schedule.total_stepz=4'"),
])
def test_bad_specs_are_one_line_and_write_nothing(recipe, tmp_path, capsys, text, message):
    spec = write_spec(tmp_path, recipe, text)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{spec}: {message}" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- many workers: PostgreSQL, Slurm

POSTGRES_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_postgres_user(command):
    """initdb and postgres refuse to run as root (what CI runs as): run them as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@pytest.fixture(scope="module")
def postgres_url():
    if not POSTGRES_BIN or not os.path.exists(os.path.join(POSTGRES_BIN[-1], "initdb")):
        pytest.skip("PostgreSQL binaries absent (/usr/lib/postgresql/*/bin/initdb); apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 absent (pip install psycopg2-binary)")
    bin_dir = POSTGRES_BIN[-1]
    root = tempfile.mkdtemp(prefix="minicpm-pg-")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = os.path.join(root, "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(_as_postgres_user([f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                                      "--no-sync"]), check=True, capture_output=True)
    subprocess.run(_as_postgres_user([f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w",
                                      "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                                      "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres_user([f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgres_share_one_study(grid_sweep, postgres_url):
    spec, reference, reference_rows, _ = grid_sweep
    out = reference.parent / "postgres"
    workers = [sweep_command(spec, "--out", out, "--storage", postgres_url, "--worker", "--workers", "1")
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    started = [line.split(":")[0] for output in outputs for line in output.splitlines() if " -> " in line]
    assert len(started) == len(set(started)) == 6  # every trial ran once, on one of the two workers
    assert all(any(" -> " in line for line in output.splitlines()) for output in outputs)  # both worked
    assert not (out / "trials.csv").exists()  # workers leave the table to the sweep command

    summary = sweep_command(spec, "--out", out, "--storage", postgres_url)
    output, _ = summary.communicate(timeout=600)
    assert summary.returncode == 0 and " -> " not in output, output
    rows = read_trials_csv(out / "trials.csv")
    assert finished(rows) == finished(reference_rows)


def test_slurm_job_script_names_the_worker_and_its_resources(recipe, tmp_path):
    spec = write_spec(tmp_path, recipe, "space: {optim.lr: [0.01, 0.02]}\nsampler: grid\nname: lr\n")
    result = subprocess.run([sys.executable, "-m", "minicpm", "sweep", str(spec), "--out", str(tmp_path / "sw"),
                             "--launcher", "slurm", "--partition", "gpu", "--gpus", "2", "--time", "90", "--cpus", "8",
                             "--storage", "postgresql://u@db/optuna", "--dry-run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=lr", "#SBATCH --nodes=1"):
        assert line in script
    assert (f"-m minicpm sweep {spec} --out {tmp_path / 'sw'} --worker --storage postgresql://u@db/optuna"
            in script)
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_slurm_launcher_runs_its_workers_through_submitit(recipe, tmp_path):
    """submitit's local executor runs the same job as a process here: the worker finishes a 2-point grid."""
    from minicpm.jobs.slurm import SlurmOptions
    from minicpm.sweep.workers import submit_workers

    spec = write_spec(tmp_path, recipe, "space: {optim.lr: [0.01, 0.02]}\nsampler: grid\nworkers: 1\n")
    jobs = submit_workers(spec, tmp_path / "sw", SlurmOptions(), jobs=1, cluster="local")
    assert len(jobs) == 1 and jobs[0].result() == 0  # the worker's exit status
    assert jobs[0].stdout().count(" -> ") == 2  # it ran both trials
    summary = sweep_command(spec, "--out", tmp_path / "sw")
    output, _ = summary.communicate(timeout=300)
    rows = read_trials_csv(tmp_path / "sw/trials.csv")
    assert sorted(r["state"] for r in rows) == ["complete", "complete"], output


@pytest.mark.slow
def test_tied_keys_take_their_values_together(recipe, tmp_path):
    """Equal tokens at every batch size (the batch-size recipe): the batch and the number of steps are one choice."""
    spec = write_spec(tmp_path, recipe, "space: {batch.tokens_per_step+schedule.total_steps: [[128, 4], [256, 2]]}\n"
                                        "sampler: grid\nworkers: 2\nthreads: 1\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 0
    rows = read_trials_csv(tmp_path / "out" / "trials.csv")
    assert [(r["state"], r["batch.tokens_per_step+schedule.total_steps"]) for r in rows] == [
        ("complete", "[128, 4]"), ("complete", "[256, 2]")]
    for row in rows:
        config = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        tokens, steps = json.loads(row["batch.tokens_per_step+schedule.total_steps"])
        assert (config["batch"]["tokens_per_step"], config["schedule"]["total_steps"]) == (tokens, steps)
