"""`minicpm scaling compare-schedules`: the comparison that justifies the WSD campaign (paper §4.3, Fig. 5/6).

For each size and run length D (multiples of N tokens), at equal tokens:
    cosine       a run from scratch with Cosine(T = D), decaying to 10% of the LR (the paper's best cosine, T = S)
    wsd-10%      a decay over the last 10% of D, branched from the size's one stable run (and 2.5%, or any fraction)
    constant     the stable run itself at D (the LR never decays)

Every arm trains on the same data: a recipe whose data.decay differs from data.stable is refused (the WSD arms alone
would see it) unless the spec sets allow_different_data: true.

    DIR/runs/SIZE/stable/, cosine-20N/, wsd-10%-20N/ ...   the runs
    DIR/schedules.csv    size,N,D,schedule,loss,bpb,run
    DIR/schedules.png    training loss against tokens per size, the final held-out losses marked
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.jobs.job import Job
from minicpm.jobs.launchers import build_launcher
from minicpm.jobs.pool import run_jobs
from minicpm.scaling.campaign import (FINAL_ONLY, branch_job, is_stable, label, prepare_recipe, recipe_config,
                                      stable_job, stages_done, steps_for)
from minicpm.scaling.spec import load_campaign_spec
from minicpm.specs import spec_error
from minicpm.files import write_atomic
from minicpm.rundir import RunDir

COLUMNS = ("size", "N", "D", "schedule", "loss", "bpb", "run")


@dataclass
class Entry:
    size: str
    n: int
    multiple: float
    schedule: str
    run_dir: Path
    final_step: int
    run: str


def _fraction_name(f: float) -> str:
    return f"wsd-{f * 100:g}%"


@dataclass
class ScheduleComparison:
    out: Path
    rows: list[dict]
    csv: Path
    plot: Path | None

    def summary(self) -> str:
        schedules = list(dict.fromkeys(r["schedule"] for r in self.rows))
        by = {(r["size"], r["D"], r["schedule"]): r["loss"] for r in self.rows}
        keys = list(dict.fromkeys((r["size"], r["D"]) for r in self.rows))
        out = [f"held-out loss (nats/token) at equal tokens D\n{'size':<12}{'D':>12}"
               + "".join(f"{s:>12}" for s in schedules) + "   best"]
        for size, d in keys:
            losses = {s: by.get((size, d, s)) for s in schedules}
            best = min((v, s) for s, v in losses.items() if v is not None)[1]
            out.append(f"{size:<12}{d:>12,}" + "".join(f"{'-' if v is None else f'{v:.4f}':>12}"
                                                        for v in losses.values()) + f"   {best}")
        out.append(f"table: {self.csv}")
        if self.plot:
            out.append(f"plot: {self.plot}")
        return "\n".join(out)


def check_same_data(spec, cfg) -> None:
    """A fair comparison: every arm trains on the same data. The WSD arms decay on the recipe's data.decay while
    cosine and constant train on data.stable throughout, so a decay mixture other than the stable one is refused
    unless the spec sets allow_different_data."""
    decay = cfg.data.decay
    if decay is None or decay == cfg.data.stable or spec.allow_different_data:
        return
    raise spec_error(spec.path, "data.decay", f"the WSD arms would decay on {decay} while cosine and constant train "
                                              f"on {cfg.data.stable}: the arms' data differ; set data.decay to null "
                                              f"(one mixture in every arm) or allow_different_data: true")


def plan_comparison(spec, out: Path) -> tuple[list[Job], list[Entry]]:
    cfg = recipe_config(spec)
    check_same_data(spec, cfg)
    recipe = prepare_recipe(spec, out, cfg)
    jobs: list[Job] = []
    entries: list[Entry] = []
    for size in spec.sizes:
        n = size.non_embedding_params()
        base = out / "runs" / size.name
        stages: list[int] = []
        branches: list[tuple[str, int, int, float]] = []
        for m in spec.tokens:
            total = steps_for(m, n, recipe, size, spec.path, "tokens")
            stages.append(total)
            for f in spec.decay_fractions:
                decay = max(1, round(f * total))
                start = total - decay
                if start <= recipe.warmup_steps:
                    raise MiniCPMError(f"{spec.path}: decay_fractions: a {f:g} decay of {label(m)} starts at step "
                                       f"{start}, inside the {recipe.warmup_steps} warmup steps (size {size.name})")
                stages.append(start)
                branches.append((f"{_fraction_name(f)}-{label(m)}", start, decay, m))
            name = f"cosine-{label(m)}"
            jobs.append(Job(f"{size.name}/{name}", base / name, {
                "config": str(recipe.path),
                "overrides": [*size.overrides(), "schedule.kind=cosine", f"schedule.total_steps={total}",
                              "schedule.floor=0.1", "schedule.cosine_period=null", *FINAL_ONLY],
                "run_dir": str(base / name)}))
            entries.append(Entry(size.name, n, m, "cosine", base / name, total, f"{size.name}/{name}"))
            entries.append(Entry(size.name, n, m, "constant", base / "stable", total, f"{size.name}/stable"))
        stable = stable_job(f"{size.name}/stable", base / "stable", recipe, size, stages)
        jobs.insert(len(jobs) - len(spec.tokens), stable)
        for name, start, decay, m in branches:
            jobs.append(branch_job(f"{size.name}/{name}", base / name, stable, start, decay, spec))
            entries.append(Entry(size.name, n, m, name.rsplit("-", 1)[0], base / name, start + decay,
                                 f"{size.name}/{name}"))
    return jobs, entries


def comparison_rows(entries: list[Entry], tokens_per_step: int) -> list[dict]:
    rows = []
    for e in entries:
        record = RunDir(e.run_dir).last_eval(step=e.final_step)
        if record is None:
            continue
        rows.append({"size": e.size, "N": e.n, "D": int(record.get("tokens") or e.final_step * tokens_per_step),
                     "schedule": e.schedule, "loss": record["eval_loss"], "bpb": record.get("eval_bpb", math.nan),
                     "run": e.run})
    order = {"cosine": 0, "constant": 9}
    return sorted(rows, key=lambda r: (r["size"], r["D"], order.get(r["schedule"], 1), r["schedule"]))


def compare_schedules(spec_path: str | Path, out: str | Path, *, workers: int | None = None,
                      launcher: dict | None = None, echo=print) -> ScheduleComparison:
    """Train (or resume) every run of the comparison through the spec's launcher (`launcher`: a command line's
    values over the spec's, as run_campaign takes them); write DIR/schedules.csv and the plot."""
    spec = load_campaign_spec(spec_path, "schedules")
    out = Path(out)
    workers = spec.workers if workers is None else workers
    runner = build_launcher(spec.launcher.updated(**(launcher or {})), threads=spec.threads, folder=out / "slurm",
                            workers=workers)
    jobs, entries = plan_comparison(spec, out)
    from minicpm.train.config import load_config

    tokens_per_step = load_config(out / "recipe.yaml").batch.tokens_per_step
    finished = {e.run_dir for e in entries
                if e.schedule != "constant" and RunDir(e.run_dir).last_eval(step=e.final_step)}
    todo = [j for j in jobs if not (stages_done(j) if is_stable(j) else j.run_dir in finished)]
    errors = run_jobs(todo, launcher=runner, workers=workers, echo=echo)
    rows = comparison_rows(entries, tokens_per_step)
    path = write_atomic(out / "schedules.csv", _csv(rows))
    if errors:
        first = next(iter(errors.items()))
        raise MiniCPMError(f"{len(errors)} run(s) failed, first {first[0]}: {first[1]} (re-run to continue)")
    plot = plot_comparison(entries, rows, out / "schedules.png") if rows else None
    return ScheduleComparison(out, rows, path, plot)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r["size"], r["N"], r["D"], r["schedule"], repr(float(r["loss"])), repr(float(r["bpb"])),
                         r["run"]])
    return buffer.getvalue()


def plot_comparison(entries: list[Entry], rows: list[dict], path: Path) -> Path:
    """Paper Fig. 5/6: per size, the training loss against tokens of every run (the stable run once), its final
    held-out loss as a marker."""
    from minicpm.plots import figure, save_png

    sizes = list(dict.fromkeys(e.size for e in entries))
    fig = figure(6 * len(sizes), 4.5, dpi=120)
    axes = fig.subplots(1, len(sizes), squeeze=False)
    schedules = list(dict.fromkeys(e.schedule for e in entries))
    colors = {s: f"C{i}" for i, s in enumerate(schedules)}
    for ax, size in zip(axes[0], sizes):
        seen: set[Path] = set()
        for e in (e for e in entries if e.size == size):
            if e.run_dir not in seen:
                seen.add(e.run_dir)
                curve = [(r["tokens"], r["loss"]) for r in RunDir(e.run_dir).read_metrics()
                         if isinstance(r.get("loss"), (int, float)) and "tokens" in r]
                if curve:
                    ax.plot(*zip(*curve), color=colors[e.schedule], lw=1, alpha=0.8)
        finals = [r for r in rows if r["size"] == size]
        for r in finals:
            ax.scatter([r["D"]], [r["loss"]], color=colors[r["schedule"]], s=30, zorder=3, edgecolor="k")
        if finals:  # the end of training, where the schedules differ, not the first steps' drop
            low, high = min(r["loss"] for r in finals), max(r["loss"] for r in finals)
            ax.set_ylim(low - 0.1 * (high - low) - 0.02, high + 0.6 * (high - low) + 0.2)
        ax.set(xlabel="tokens", ylabel="loss (lines: training; dots: held-out at D)", title=size)
    for s in schedules:
        axes[0][0].plot([], [], color=colors[s], label=s)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("cosine (T = D) vs WSD decays vs constant LR at equal tokens")
    return save_png(fig, path)
