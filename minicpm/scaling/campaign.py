"""`minicpm scaling campaign`: the WSD scaling campaign of paper §4.5. Per model size, one stable run (constant LR
after warmup) with a checkpoint at every decay point (k·N tokens), and one decay branch from each (the decay
fraction of that point's tokens); every finished branch is evaluated in loss per token and bits per byte. m sizes
x m points cost O(m) runs where one cosine run per (size, tokens) costs O(m²) (paper §4.3).

    DIR/recipe.yaml          the training recipe every run uses (the spec's base config, overrides and data)
    DIR/spec.json            what the runs were made from (a different spec in the same DIR is an error)
    DIR/runs/SIZE/stable/    the stable run; DIR/runs/SIZE/decay-10N/ ... its branches (RUN/job.log: its output)
    DIR/campaign.csv         size,N,D,flops,loss,bpb,run: one row per finished branch (N non-embedding params,
                             D tokens trained, flops = 6·N·D)
    DIR/fit.json, fit.txt    the fit of L(N, D) to the table

Every run is a job of minicpm.jobs, started by the spec's launcher (local child processes, torchrun jobs or Slurm
jobs); a branch starts as soon as its stable checkpoint exists. Re-running continues: finished runs are read,
interrupted ones resume from their last checkpoint, so a campaign killed mid-way (even with SIGKILL: its local runs
die with it) and resumed writes the table an uninterrupted one would.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.jobs.job import Job
from minicpm.jobs.launchers import build_launcher
from minicpm.jobs.pool import run_jobs
from minicpm.rundir import RunDir, is_complete
from minicpm.scaling.decay import branch_decay, train_stable_stages
from minicpm.scaling.spec import CampaignSpec, Size, load_campaign_spec

CSV_COLUMNS = ("size", "N", "D", "flops", "loss", "bpb", "run")
STABLE_OVERRIDES = ("schedule.kind=constant", "run.checkpoint_every=0", "run.eval_every=0", "run.keep_last=0",
                    "run.progress=false")
"""The stable phase: a constant LR after warmup, checkpoints and evals only where a stage ends."""
FINAL_ONLY = ("run.checkpoint_every=0", "run.eval_every=0", "run.keep_last=1", "run.progress=false")
"""Branches and single runs: one checkpoint and one eval, at the end."""


# ---------------------------------------------------------------- the recipe and the steps

@dataclass
class Recipe:
    path: Path
    tokens_per_step: int
    warmup_steps: int


def recipe_config(spec: CampaignSpec):
    """The training recipe every run of the spec starts from: base config + overrides + the spec's data keys."""
    from minicpm.train.config import load_config

    cfg = load_config(spec.config, spec.overrides)
    if spec.data:
        for key, value in spec.data.items():
            setattr(cfg.data, key, dict(value) if isinstance(value, dict) else value)
    if not cfg.data.stable:
        raise MiniCPMError(f"{spec.path}: no data: set data.stable in the spec or in base.config")
    return cfg


def prepare_recipe(spec: CampaignSpec, out: Path, cfg=None) -> Recipe:
    """Write DIR/recipe.yaml (`cfg`, default recipe_config(spec)) and DIR/spec.json; a DIR made from a different
    spec is an error (its runs would not belong to one campaign)."""
    from minicpm.train.config import config_to_yaml

    fingerprint = spec.fingerprint()
    recorded = out / "spec.json"
    if recorded.is_file() and recorded.read_text(encoding="utf-8").strip() != fingerprint:
        raise MiniCPMError(f"{out} holds a campaign made from a different spec ({recorded}); use another --out")
    cfg = recipe_config(spec) if cfg is None else cfg
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(recorded, fingerprint + "\n")
    path = write_atomic(out / "recipe.yaml", config_to_yaml(cfg))
    return Recipe(path, cfg.batch.tokens_per_step, cfg.schedule.warmup_steps)


def steps_for(multiple: float, n: int, recipe: Recipe, size: Size, spec_path: Path, key: str) -> int:
    """The step at which `multiple`·N tokens have been trained (rounded), checked to lie past the warmup."""
    step = round(multiple * n / recipe.tokens_per_step)
    if step <= recipe.warmup_steps:
        raise MiniCPMError(f"{spec_path}: {key}: {multiple:g}N = {multiple * n:,.0f} tokens is {step} step(s) of "
                           f"{recipe.tokens_per_step} tokens for size {size.name} (N={n:,}), not past the "
                           f"{recipe.warmup_steps} warmup steps: raise it or lower batch.tokens_per_step")
    return step


def label(multiple: float) -> str:
    return f"{multiple:g}N"


def stable_job(name: str, run_dir: Path, recipe: Recipe, size: Size, stages: list[int]) -> Job:
    return Job(name, run_dir, {"config": str(recipe.path), "overrides": [*size.overrides(), *STABLE_OVERRIDES],
                               "run_dir": str(run_dir), "stages": sorted(set(stages))}, work=train_stable_stages)


def is_stable(job: Job) -> bool:
    return job.work is train_stable_stages


def stages_done(job: Job) -> bool:
    """Whether a stable job has its checkpoint at every stage (its branches can all start)."""
    return all(is_complete(RunDir(job.run_dir).checkpoint_dir(step)) for step in job.kwargs["stages"])


def branch_job(name: str, run_dir: Path, stable: Job, step: int, decay_steps: int, spec: CampaignSpec) -> Job:
    source = RunDir(stable.run_dir).checkpoint_dir(step)
    return Job(name, run_dir, {"source": str(source), "decay_steps": decay_steps, "out": str(run_dir),
                               "overrides": list(FINAL_ONLY), "decay": spec.decay,
                               "half_life": spec.half_life * decay_steps},
               work=branch_decay, ready=lambda: is_complete(source), blocked_by=stable.name)


# ---------------------------------------------------------------- the campaign

@dataclass
class Branch:
    size: Size
    n: int
    multiple: float
    step: int
    """The stable checkpoint it branches from."""
    decay_steps: int
    run_dir: Path
    run: str
    """Its name in the table: SIZE/decay-10N."""


@dataclass
class CampaignPlan:
    spec: CampaignSpec
    out: Path
    recipe: Recipe
    stable_steps: dict[str, int]
    branches: list[Branch]
    jobs: list[Job]

    def cost(self) -> "Cost":
        tps = self.recipe.tokens_per_step
        trained = sum(self.stable_steps.values()) * tps + sum(b.decay_steps for b in self.branches) * tps
        cosine = sum((b.step + b.decay_steps) * tps for b in self.branches)
        return Cost(trained, cosine)


@dataclass
class Cost:
    trained: int
    """Tokens the campaign trains: every stable run plus every decay."""
    cosine: int
    """Tokens one cosine run from scratch per (size, point) would train."""

    def line(self) -> str:
        return (f"cost: {self.trained:,} tokens trained (stable runs + decays) against {self.cosine:,} for one "
                f"cosine run per (size, point): {self.cosine / self.trained:.2f}x fewer, "
                f"{1 - self.trained / self.cosine:.0%} saved")


def plan_campaign(spec: CampaignSpec, out: str | Path) -> CampaignPlan:
    out = Path(out)
    recipe = prepare_recipe(spec, out)
    stable_steps: dict[str, int] = {}
    branches: list[Branch] = []
    jobs: list[Job] = []
    for size in spec.sizes:
        n = size.non_embedding_params()
        points = {p: steps_for(p, n, recipe, size, spec.path, "decay_points") for p in spec.decay_points}
        if len(set(points.values())) < len(points):
            raise MiniCPMError(f"{spec.path}: decay_points: two points round to the same step for size {size.name} "
                               f"(N={n:,}, {recipe.tokens_per_step} tokens/step): space them further apart")
        end = steps_for(spec.stable_until, n, recipe, size, spec.path, "stable_until")
        stable_steps[size.name] = max(end, *points.values())
        stable = stable_job(f"{size.name}/stable", out / "runs" / size.name / "stable", recipe, size,
                            [*points.values(), end])
        jobs.append(stable)
        for p, step in points.items():
            name = f"{size.name}/decay-{label(p)}"
            decay_steps = max(1, round(spec.decay_fraction * step))
            branch = Branch(size, n, p, step, decay_steps, out / "runs" / name, name)
            branches.append(branch)
            jobs.append(branch_job(name, branch.run_dir, stable, step, decay_steps, spec))
    # the stable runs are the critical path: the largest first, and every stable run before any branch
    jobs.sort(key=lambda j: (not is_stable(j), -stable_steps[j.name.split("/")[0]] if is_stable(j) else 0))
    return CampaignPlan(spec, out, recipe, stable_steps, branches, jobs)


@dataclass
class CampaignResult:
    plan: CampaignPlan
    rows: list[dict]
    csv: Path
    errors: dict[str, str] = field(default_factory=dict)
    fit_text: str | None = None
    fit_note: str | None = None

    def summary(self) -> str:
        lines = [format_table(self.rows), self.plan.cost().line(), f"table: {self.csv}"]
        for name, error in self.errors.items():
            lines.append(f"failed: {name}: {error}")
        if self.fit_text:
            lines += ["", self.fit_text]
        elif self.fit_note:
            lines.append(f"fit: skipped ({self.fit_note})")
        return "\n".join(lines)


def table_rows(plan: CampaignPlan) -> list[dict]:
    """One row per finished branch, in the order of the spec's sizes and points."""
    rows = []
    for b in plan.branches:
        record = RunDir(b.run_dir).last_eval(step=b.step + b.decay_steps)
        if record is None:
            continue
        d = int(record.get("tokens") or (b.step + b.decay_steps) * plan.recipe.tokens_per_step)
        rows.append({"size": b.size.name, "N": b.n, "D": d, "flops": 6.0 * b.n * d, "loss": record["eval_loss"],
                     "bpb": record.get("eval_bpb", math.nan), "run": b.run})
    return rows


def campaign_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["size"], r["N"], r["D"], f"{r['flops']:.6g}", repr(float(r["loss"])),
                         repr(float(r["bpb"])), r["run"]])
    return buffer.getvalue()


def format_table(rows: list[dict]) -> str:
    out = [f"{'size':<12}{'N':>10}{'D':>12}{'D/N':>7}{'loss':>9}{'bpb':>9}  run"]
    for r in rows:
        out.append(f"{r['size']:<12}{r['N']:>10,}{r['D']:>12,}{r['D'] / r['N']:>7.1f}{r['loss']:>9.4f}"
                   f"{r['bpb']:>9.4f}  {r['run']}")
    return "\n".join(out)


def run_campaign(spec_path: str | Path, out: str | Path, *, workers: int | None = None,
                 launcher: dict | None = None, fit: bool = True, echo=print) -> CampaignResult:
    """Train (or resume) every stable run and branch of the spec, write DIR/campaign.csv, then fit it.
    launcher: what a command line sets over the spec's launcher keys (kind, nproc_per_node, partition, gpus, time,
    cpus, cluster; None values keep the spec's)."""
    spec = load_campaign_spec(spec_path, "campaign")
    workers = spec.workers if workers is None else workers
    runner = build_launcher(spec.launcher.updated(**(launcher or {})), threads=spec.threads,
                            folder=Path(out) / "slurm", workers=workers)
    plan = plan_campaign(spec, out)
    finished = {r["run"] for r in table_rows(plan)}
    todo = [j for j in plan.jobs if j.name not in finished]
    # a stable run trains on while a stage it has not reached is still wanted by an unfinished branch
    todo = [j for j in todo if not is_stable(j) or (not stages_done(j) and any(b.blocked_by == j.name
                                                                               for b in todo))]
    echo(f"campaign {plan.out}: {len(spec.sizes)} sizes x {len(spec.decay_points)} decay points; "
         f"{len(finished)} of {len(plan.branches)} branches already finished")
    echo(plan.cost().line())
    errors = run_jobs(todo, launcher=runner, workers=workers, echo=echo)
    rows = table_rows(plan)
    result = CampaignResult(plan, rows, write_atomic(plan.out / "campaign.csv", campaign_csv(rows)), errors)
    if errors:
        first = next(iter(errors.items()))
        raise MiniCPMError(f"{len(errors)} run(s) failed, first {first[0]}: {first[1]} (the finished ones are in "
                           f"{result.csv}; fix the cause and re-run to continue)")
    if fit:
        try:
            result.fit_text = fit_campaign(plan, rows)
        except MiniCPMError as e:
            result.fit_note = str(e)
    return result


PAPER_FIT = ("bpb", "lsq", "chinchilla")
"""Paper §4.5: L = C_N·N^-alpha + C_D·D^-beta + L0 by least squares (curve_fit) on loss per byte."""
DEFAULT_FIT = ("loss", "huber", None)
"""Ours: Huber on log loss per token (approach 3), the default law (laws/variants.py)."""


def fit_campaign(plan: CampaignPlan, rows: list[dict]) -> str:
    """Fit L(N, D) to the table (the spec's loss column, method and law); writes DIR/fit.json and DIR/fit.txt.
    The paper's mode (or, when the spec asks for it, ours) is fitted too and shown beside it, in DIR/fit.txt and
    DIR/fit-{loss}-{method}.json."""
    from minicpm.laws import report as fit_report

    spec = plan.spec
    chosen = (spec.fit_loss, spec.fit_method, spec.fit_law)
    other = DEFAULT_FIT if chosen[:2] == PAPER_FIT[:2] else PAPER_FIT
    report = _fit_mode(plan, rows, *chosen)
    text = fit_report.format_report(report)
    write_atomic(plan.out / "fit.json", fit_report.dumps(fit_report.report_json(report)) + "\n")
    try:
        beside = _fit_mode(plan, rows, *other)
    except MiniCPMError as e:
        text += f"\n\n{_mode_name(*other)}: not fitted ({e})"
    else:
        write_atomic(plan.out / f"fit-{other[0]}-{other[1]}.json",
                     fit_report.dumps(fit_report.report_json(beside)) + "\n")
        text += "\n\nBoth fits side by side\n" + fit_report.format_side_by_side(
            [(_mode_name(*chosen), report), (_mode_name(*other), beside)])
    write_atomic(plan.out / "fit.txt", text + "\n")
    return text


def _mode_name(loss: str, method: str, law: str | None) -> str:
    return "paper (bpb, lsq)" if (loss, method) == PAPER_FIT[:2] else f"{loss}, {method}"


def _fit_mode(plan: CampaignPlan, rows: list[dict], loss: str, method: str, law: str | None):
    import numpy as np

    from minicpm.laws import report as fit_report
    from minicpm.laws.tables import RunTable

    values = np.array([r[loss] for r in rows], dtype=float)
    if not np.all(np.isfinite(values)):
        raise MiniCPMError(f"{plan.out / 'campaign.csv'}: column {loss!r} has missing values")
    table = RunTable(np.array([r["N"] for r in rows], dtype=float), np.array([r["D"] for r in rows], dtype=float),
                     values, [r["run"] for r in rows], np.array([r["flops"] for r in rows], dtype=float),
                     source=str(plan.out / "campaign.csv"))
    return fit_report.analyse_table(table, n_boot=plan.spec.fit_bootstrap, method=method, law=law)
