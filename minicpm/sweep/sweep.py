"""`minicpm sweep`: hyper-parameter sweeps where every trial is an ordinary run directory (paper §3, App. A).

    DIR/study.journal        the Optuna study (embedded store), unless --storage URL names a database
    DIR/runs/trial_0003/     one training run per trial, trained by `minicpm train` in its own process (a job of
                             minicpm.jobs: a local child, or a torchrun job with trial_launcher: torchrun)
    DIR/runs/trial_0003/job.log     that process's output
    DIR/trials.csv           number, state, the parameters by dotted key, the metric, the run directory, the error

The study store. By default a JournalStorage on a file in DIR: Optuna's own advice for several processes on one
machine (its RDB code says SQLite is never recommended for parallel optimisation), append-only, so a process
killed mid-write leaves a torn last line that the reader skips rather than a broken database. The file lock is
JournalFileOpenLock (O_EXCL create), which also works on the shared filesystems (NFSv3+) a Slurm cluster's nodes
share. `--storage URL` takes any SQLAlchemy URL (PostgreSQL for many machines) through Optuna's RDBStorage.

Bookkeeping on top of Optuna, kept in trial user attributes so that every worker sees it:
  run       the run directory's name; a retry of an interrupted trial reuses its original's and resumes it
  worker    host:pid of the process running the trial, and heartbeat, its last sign of life
  error     a failed trial's one-line message
  skipped   a trial asked for past the budget (never run, never listed)
  retry_of  the trial an enqueued retry replaces
A trial left RUNNING by a dead worker (same host and its pid gone, or its heartbeat older than stale_after) is
interrupted: it is marked FAIL without an error, which makes it "superseded", and a retry with the same
parameters is enqueued. The budget counts "slots": trials that are neither skipped nor retries, so an interrupted
trial and its retry count once. A grid's points are enqueued, in order, by the process that creates the study, so
that parallel workers pop each point exactly once.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.jobs.job import Job
from minicpm.jobs.launchers import LauncherConfig, build_launcher
from minicpm.jobs.pool import POLL_S
from minicpm.rundir import RunDir
from minicpm.sweep.spec import SweepSpec, build_pruner, load_spec, overrides_for, require_optuna

STUDY_FILE = "study.journal"
RUNS_DIR = "runs"
TRIALS_CSV = "trials.csv"
HEARTBEAT_S = 10.0
SETUP_WAIT_S = 30.0


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    csv: Path | None

    def summary(self, metric: str) -> str:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        lines = [f"sweep {self.out}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
        if self.best:
            params = ", ".join(f"{k}={v}" for k, v in self.best["params"].items())
            lines.append(f"best: trial {self.best['number']} {metric} {self.best['value']:.6g} ({params}) "
                         f"in {self.best['run_dir']}")
        for row in self.rows:
            if row["state"] == "failed":
                lines.append(f"failed: trial {row['number']}: {row['error']}")
        if self.csv:
            lines.append(f"trials: {self.csv}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the study

def open_storage(out: Path, url: str | None):
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url:
        # workers starting together race to create the schema's tables: the losers see a unique violation (on
        # PostgreSQL's catalog) or a duplicate table, and find the tables made when they try again
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            except Exception as e:  # sqlalchemy's errors: a bad URL, a missing driver, a refused connection
                message = str(e).lower()
                if attempt == 4 or not any(w in message for w in ("unique", "duplicate", "already exists")):
                    raise MiniCPMError(f"--storage {_hide_password(url)}: {str(e).splitlines()[0]}") from None
                time.sleep(0.5 + random.random())
    path = out / STUDY_FILE
    out.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _hide_password(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        if ":" in credentials:
            return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def _sampler(spec: SweepSpec, seed: int):
    import optuna

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # grid points are enqueued; the sampler then only ever sees a trial past the budget, which is skipped
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(spec: SweepSpec, storage, *, worker_seed: int = 0):
    """Create the study (enqueueing a grid's points) or join the existing one; a different spec is an error."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction, pruner = spec.direction, build_pruner(spec.pruner)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction=direction,
                                    sampler=_sampler(spec, spec.seed), pruner=pruner)
        if spec.sampler == "grid":
            for index, params in enumerate(grid_points(spec)):
                study.enqueue_trial(params, user_attrs={"grid": index}, skip_if_exists=False)
        study.set_user_attr("spec", spec.fingerprint())
    except optuna.exceptions.DuplicatedStudyError:
        existing = optuna.load_study(study_name=spec.name, storage=storage)
        deadline = time.time() + SETUP_WAIT_S
        while "spec" not in existing.user_attrs:  # its creator is still enqueueing the grid
            if time.time() > deadline:
                raise MiniCPMError(f"the study {spec.name!r} was left half made (no spec recorded after "
                                   f"{SETUP_WAIT_S:.0f} s); delete it (or its {STUDY_FILE}) and start again")
            time.sleep(0.2)
            existing = optuna.load_study(study_name=spec.name, storage=storage)
        recorded = existing.user_attrs["spec"]
        if recorded != spec.fingerprint():
            raise MiniCPMError(f"the study {spec.name!r} in this store was made from a different spec "
                               f"({_first_difference(recorded, spec.fingerprint())}); use another --out or name")
        # each process samples from its own stream: the seed, how far the study is, and which worker this is
        seed = spec.seed * 1_000_003 + len(existing.trials) * 7919 + worker_seed
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec, seed),
                                  pruner=pruner)
    return study


def _first_difference(recorded: str, current: str) -> str:
    import json

    a, b = json.loads(recorded), json.loads(current)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} was {a.get(key)!r}, now {b.get(key)!r}"
    return "unknown difference"


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid's first `trials` points, in the order of the space's keys (the last key varies fastest)."""
    keys = list(spec.space)
    points = [dict(zip(keys, values)) for values in itertools.product(*(spec.space[k].choices for k in keys))]
    return points[:spec.trials]


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    params = {}
    for key, p in spec.space.items():
        if p.choices is not None:
            params[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.is_int:
            params[key] = trial.suggest_int(key, p.low, p.high, log=p.log)
        else:
            params[key] = trial.suggest_float(key, float(p.low), float(p.high), log=p.log)
    return params


# ---------------------------------------------------------------- trial states

def is_skipped(t) -> bool:
    return bool(t.user_attrs.get("skipped"))


def is_retry(t) -> bool:
    return "retry_of" in t.user_attrs


def is_superseded(t) -> bool:
    """An interrupted trial: failed, but not by a trial's own error (its retry carries its result)."""
    from optuna.trial import TrialState

    return t.state == TrialState.FAIL and "error" not in t.user_attrs and not is_skipped(t)


def is_slot(t) -> bool:
    """A trial that counts against the budget (an interrupted one counts; its retry does not)."""
    return not is_skipped(t) and not is_retry(t)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(t, *, stale_after: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone: on this host, its pid is dead; elsewhere, its heartbeat is old."""
    from optuna.trial import TrialState

    if t.state != TrialState.RUNNING:
        return False
    now = time.time() if now is None else now
    worker = t.user_attrs.get("worker")
    if worker:
        host, _, pid = worker.rpartition(":")
        if host == socket.gethostname():
            return int(pid) != os.getpid() and not _pid_alive(int(pid))
        return now - float(t.user_attrs.get("heartbeat", 0.0)) > stale_after
    started = t.datetime_start.timestamp() if t.datetime_start else 0.0
    return now - started > stale_after


def requeue_stale(study, *, stale_after: float) -> list[int]:
    """Mark interrupted trials superseded and enqueue a retry of each (one worker wins each trial)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    requeued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, stale_after=stale_after):
            continue
        params = dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})
        if not params:  # it died before choosing its parameters: no run to resume, and no slot to fill
            study._storage.set_trial_user_attr(t._trial_id, "skipped", "interrupted before it started")
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker took it, or it just finished
        if not params:
            continue
        keep = {k: t.user_attrs[k] for k in ("grid",) if k in t.user_attrs}
        study.enqueue_trial(params, user_attrs={"retry_of": t.number,
                                                "run": t.user_attrs.get("run", f"trial_{t.number:04d}"), **keep},
                            skip_if_exists=False)
        requeued.append(t.number)
    return requeued


# ---------------------------------------------------------------- running trials

class Sweep:
    """One process's share of a sweep: `workers` threads, each asking for a trial and training it in a child
    process, until the study has its budget of trials."""

    def __init__(self, spec: SweepSpec, out: Path, *, storage_url: str | None = None, workers: int | None = None,
                 write_csv: bool = True, stale_after: float = 120.0, worker_seed: int = 0, echo=print):
        self.spec, self.out = spec, Path(out)
        self.workers = workers or spec.workers
        self.write_csv, self.stale_after, self.echo = write_csv, stale_after, echo
        self.storage = open_storage(self.out, storage_url)
        self.study = open_study(spec, self.storage, worker_seed=worker_seed)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        # the spec's trial_launcher: process (a local child) or torchrun
        launcher = LauncherConfig("torchrun" if spec.trial_launcher == "torchrun" else "local", spec.nproc_per_node)
        self.launcher = build_launcher(launcher, threads=spec.threads, folder=self.out / "slurm")
        self._ask_lock = threading.Lock()
        self._csv_lock = threading.Lock()
        self._stop = threading.Event()

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> SweepResult:
        requeued = requeue_stale(self.study, stale_after=self.stale_after)
        if requeued:
            self.echo(f"re-running interrupted trial(s) {', '.join(map(str, requeued))}")
        threads = [threading.Thread(target=self._work, name=f"sweep-worker-{i}", daemon=True)
                   for i in range(self.workers)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
        except KeyboardInterrupt:
            self._stop.set()
            for thread in threads:
                thread.join()
            raise
        return self.result()

    def _work(self) -> None:
        while not self._stop.is_set():
            claimed = self._next_trial()
            if claimed is None:
                return
            trial, params, run_name = claimed
            try:
                self._run_trial(trial, params, run_name)
            except Exception as e:  # the sweep's own fault (a storage error, say): this trial fails, others go on
                try:
                    self._fail(trial, f"sweep: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                except Exception:
                    pass  # left RUNNING: the next sweep re-runs it
            self._write_trials_csv()

    def _next_trial(self):
        """The next trial to run (a retry or a grid point first, then a new sample), or None when the budget is
        spent. Runs under a lock: this process's threads ask one at a time."""
        from optuna.trial import TrialState

        with self._ask_lock:
            while True:
                if self._budget_spent():
                    return None
                trial = self.study.ask()
                if is_retry(trial):
                    return self._claim(trial)
                trials = self.study.get_trials(deepcopy=False)
                slots_before = sum(1 for t in trials if t.number < trial.number and is_slot(t))
                past_grid = self.spec.sampler == "grid" and "grid" not in trial.user_attrs
                if slots_before < self.spec.trials and not past_grid:
                    return self._claim(trial)
                trial.set_user_attr("skipped", "budget")
                self.study.tell(trial, state=TrialState.FAIL)
                # a worker that died meanwhile leaves a trial to re-run before this one stops
                if not requeue_stale(self.study, stale_after=self.stale_after):
                    return None

    def _budget_spent(self) -> bool:
        """All slots taken and nothing waiting (asking now would only add a skipped trial to the study)."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return False
        if sum(1 for t in trials if is_slot(t)) < self.spec.trials:
            return False
        return not requeue_stale(self.study, stale_after=self.stale_after)

    def _claim(self, trial):
        params = suggest(trial, self.spec)
        run_name = trial.user_attrs.get("run") or f"trial_{trial.number:04d}"
        trial.set_user_attr("run", run_name)
        trial.set_user_attr("worker", self.identity)
        trial.set_user_attr("heartbeat", time.time())
        return trial, params, run_name

    def _run_trial(self, trial, params: dict[str, Any], run_name: str) -> None:
        import optuna
        from optuna.trial import TrialState

        run_dir = self.out / RUNS_DIR / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = [*self.spec.overrides, *overrides_for(params)]
        self.echo(f"trial {trial.number}: {' '.join(overrides_for(params))} -> {run_dir}")
        reported: set[int] = set()
        last_beat = time.time()
        pruned = False
        process = self.launcher.start(Job(f"trial-{trial.number}", run_dir, {
            "config": str(self.spec.config), "overrides": overrides, "run_dir": str(run_dir)}))
        try:
            while process.wait(POLL_S) is None:
                if self._stop.is_set():
                    return  # left RUNNING: the next sweep finds it interrupted and re-runs it
                if self.spec.pruner and self._report(trial, run_dir, reported) and trial.should_prune():
                    pruned = True
                    break
                if time.time() - last_beat > HEARTBEAT_S:
                    trial.set_user_attr("heartbeat", time.time())
                    last_beat = time.time()
        finally:
            if process.poll() is None:
                process.stop()
        if pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.echo(f"trial {trial.number}: pruned")
            return
        if process.poll() != 0:
            return self._fail(trial, process.failure())
        if self.spec.pruner:
            self._report(trial, run_dir, reported)
        value = last_metric(run_dir, self.spec.metric)
        if value is None:
            return self._fail(trial, f"{RunDir(run_dir).metrics_file} has no {self.spec.metric!r} "
                                     f"(name a logged key in metric:, or set run.eval_every)")
        try:
            self.study.tell(trial, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker judged this trial interrupted meanwhile; its retry gives the same result
        self.echo(f"trial {trial.number}: {self.spec.metric} {value:.6g}")

    def _report(self, trial, run_dir: Path, reported: set[int]) -> bool:
        """Report the evaluations logged since the last call (intermediate values for the pruner)."""
        new = False
        for record in RunDir(run_dir).read_metrics():
            step, value = record.get("step"), record.get(self.spec.metric)
            if isinstance(step, int) and isinstance(value, (int, float)) and step not in reported:
                trial.report(float(value), step)
                reported.add(step)
                new = True
        return new

    def _fail(self, trial, error: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("error", error)
        self.study.tell(trial, state=TrialState.FAIL)
        self.echo(f"trial {trial.number}: failed: {error}")

    # --- results -----------------------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        from optuna.trial import TrialState

        states = {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned",
                  TrialState.RUNNING: "running"}
        trials = self.study.get_trials(deepcopy=False)
        replaces = {t.number: t.user_attrs.get("retry_of") for t in trials}

        def number(n: int) -> int:  # a retry is listed as the trial it replaces, as if never interrupted
            while replaces.get(n) is not None:
                n = replaces[n]
            return n

        rows = []
        for t in trials:
            if t.state == TrialState.WAITING or is_skipped(t) or is_superseded(t):
                continue
            rows.append({"number": number(t.number), "state": states[t.state], "params": dict(t.params),
                         "value": t.value if t.state == TrialState.COMPLETE else None,
                         "run_dir": str(self.out / RUNS_DIR / t.user_attrs.get("run", f"trial_{t.number:04d}")),
                         "error": t.user_attrs.get("error", "")})
        return sorted(rows, key=lambda row: row["number"])

    def result(self) -> SweepResult:
        rows = self.rows()
        path = self._write_trials_csv(rows) if self.write_csv else None
        done = [r for r in rows if r["state"] == "complete"]
        best = None
        if done:
            pick = min if self.spec.direction == "minimize" else max
            best = pick(done, key=lambda r: r["value"])
        return SweepResult(self.out, rows, best, path)

    def _write_trials_csv(self, rows: list[dict[str, Any]] | None = None) -> Path | None:
        if not self.write_csv:
            return None
        with self._csv_lock:
            rows = self.rows() if rows is None else rows
            return write_atomic(self.out / TRIALS_CSV, trials_csv(rows, list(self.spec.space), self.spec.metric))


def trials_csv(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", *keys, metric, "run_dir", "error"])
    for row in rows:
        writer.writerow([row["number"], row["state"], *(row["params"].get(k, "") for k in keys),
                         "" if row["value"] is None else repr(row["value"]), row["run_dir"], row["error"]])
    return buffer.getvalue()


def read_trials_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def last_metric(run_dir: str | Path, key: str) -> float | None:
    """The last value of `key` in a run's metrics.jsonl (None when it never logged it, or it is not finite)."""
    import math

    record = RunDir(run_dir).last_eval(key)
    if record is None or not math.isfinite(record[key]):
        return None
    return float(record[key])


# ---------------------------------------------------------------- the entry point

def check_space_keys(spec: SweepSpec) -> None:
    """Every space key is a config key that takes the range's low or the first choice (names the key if not)."""
    from minicpm.train.config import load_config

    load_config(spec.config, spec.overrides)
    for key, p in spec.space.items():
        value = p.choices[0] if p.choices is not None else p.low
        try:
            load_config(spec.config, [*spec.overrides, *overrides_for({key: value})])
        except MiniCPMError as e:
            raise MiniCPMError(f"{spec.path}: space.{key}: {e}") from None


def run_sweep(spec_path: str | Path, out: str | Path, *, storage: str | None = None, workers: int | None = None,
              worker: bool = False, stale_after: float = 120.0, echo=print) -> SweepResult:
    """Run (or resume, or join with worker=True) the sweep of a spec; returns the trials as trials.csv lists them."""
    spec = load_spec(spec_path)
    check_space_keys(spec)
    if workers is not None and workers < 1:
        raise MiniCPMError(f"--workers must be positive, got {workers}")
    sweep = Sweep(spec, Path(out), storage_url=storage, workers=workers, write_csv=not worker,
                  stale_after=stale_after, worker_seed=os.getpid() if worker else 0, echo=echo)
    return sweep.run()
