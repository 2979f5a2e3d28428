"""`minicpm reproduce`: the paper's findings at CPU scale, each a part of one job graph, judged from the runs.

    OUT/plan.json          the plan (full | quick | toy, × scale); a different plan in the same OUT is refused
    OUT/data/              the quickstart's text tokenized with a small vocabulary (plan.vocab_size)
    OUT/recipe.yaml        the base of every run (configs/reproduce.yaml on OUT/data)
    OUT/width/ depth/ schedules/ law/ batch/ dynamics/ two_stage/   the runs and figures of each part
    OUT/results.json       every finding: the paper's claim, verdicts with intervals, numbers, figure
    OUT/report.html        the same, as a page with the figures; OUT/results.md: as Markdown

The graph runs in two rounds on the job engine (minicpm.jobs): first everything whose settings are known (the
learning-rate grids of parts 1 and 2, and the tuning runs that choose part 3's learning rates, started first), then
everything that uses the tuned rates (parts 3 to 7; the branches start as soon as their stable checkpoint exists).
Every run resumes its own directory and a finished one is only read, so the same command after a kill (even
SIGKILL: local runs die with it) continues, and writes the results.json an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.jobs.launchers import LauncherConfig, build_launcher
from minicpm.jobs.pool import run_jobs
from minicpm.reproduce import batch_size, dynamics, scaling_law, schedules, transfer, two_stage
from minicpm.reproduce.findings import Finding
from minicpm.reproduce.plan import Plan, plan_named
from minicpm.reproduce.report import write_markdown, write_report
from minicpm.reproduce.runs import Run, prepare_corpus, quickstart_text, write_json, write_recipe


@dataclasses.dataclass
class Reproduction:
    out: Path
    findings: list[Finding]
    results: Path
    report: Path
    failed: dict[str, str]

    def table(self) -> str:
        lines = [f"{'part':<5}{'finding':<48}{'verdict':<16}"]
        for f in self.findings:
            lines.append(f"{f.part:<5}{f.title[:46]:<48}{f.outcome:<16}")
            for v in f.verdicts:
                low, high = v.interval
                lines.append(f"{'':<7}{v.outcome:<14} {v.estimate:+.4g} [{low:+.4g}, {high:+.4g}] {v.threshold}  "
                             f"{v.claim.split(':')[0]}")
        return "\n".join(lines)


def _check_plan(out: Path, plan: Plan) -> None:
    doc = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True)
    recorded = out / "plan.json"
    if recorded.is_file() and recorded.read_text(encoding="utf-8").strip() != doc:
        raise MiniCPMError(f"{out} holds a reproduction of another plan ({recorded}): use another --out, or the same "
                           f"--quick/--scale as before")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(recorded, doc + "\n")


def _train(runs: Sequence[Run], launcher, workers: int, echo) -> dict[str, str]:
    todo = [r.job for r in runs if not r.done()]
    if not todo:
        return {}
    echo(f"[reproduce] {len(todo)} run(s) to train ({len(runs) - len(todo)} done), {workers} at a time")
    return run_jobs(todo, launcher=launcher, workers=workers, echo=echo)


def reproduce(out: str | Path, *, quick: bool = False, scale: float = 1.0, data: str | Path = "quickstart",
              workers: int = 2, launcher: dict | None = None, plan: str | None = None, echo=print) -> Reproduction:
    """Train (or resume) every run of the plan (`plan`: full, quick or toy; default full, or quick with `quick`),
    judge each finding, write OUT/results.json and OUT/report.html. `launcher`: a command line's launcher values
    (kind, nproc_per_node, Slurm options), as run_campaign takes them."""
    started = time.monotonic()
    the_plan = plan_named(plan or ("quick" if quick else "full"), scale)
    out, text = Path(out), quickstart_text(data)
    _check_plan(out, the_plan)
    corpus = prepare_corpus(text, out, the_plan.vocab_size)
    recipe = write_recipe(out, corpus, the_plan)
    config = LauncherConfig().updated(**(launcher or {}))
    runner = build_launcher(config, threads=1, folder=out / "slurm", workers=workers) if workers > 0 else None
    say = lambda line: echo(line if line.startswith("[") else f"[reproduce] {line}")  # noqa: E731

    # round 1: the grids of parts 1 and 2, with part 3's tuning runs first (round 2 waits for them)
    comparison = schedules.plan_comparison(the_plan)
    tuning = schedules.tuning_runs(the_plan, out, recipe, comparison)
    widths = transfer.width_grids(the_plan, out, recipe)
    depths = transfer.depth_grids(the_plan, out, recipe)
    failed = _train([*tuning, *transfer.runs_of(widths), *transfer.runs_of(depths)], runner, workers, say)

    # round 2: everything at the tuned learning rates
    tuned = schedules.tuned_log2_lr(comparison)
    schedules.write_tuning(out, tuned, comparison)
    law_sizes: dict = {}
    batch_runs: dict = {}
    pairs: dict = {}
    arms: dict = {}
    if tuned is not None:
        branch_step = comparison.steps[the_plan.branch_multiple]
        chat = two_stage.prepare_chat_data(the_plan, out, corpus)
        round2 = schedules.comparison_runs(the_plan, out, recipe, comparison, tuned)
        law, law_sizes = scaling_law.law_runs(the_plan, out, recipe, tuned["wsd"])
        batch_runs = batch_size.batch_runs(the_plan, out, recipe, tuned["cosine"])
        pairs = dynamics.dynamics_runs(the_plan, out, comparison.stable, branch_step)
        arms = two_stage.two_stage_runs(the_plan, out, comparison.stable, branch_step, corpus, chat)
        # the stable runs first: every branch of parts 3, 6 and 7 waits for their checkpoints
        stable = [r for r in [*round2, *law] if "stages" in r.job.kwargs]
        batches = [r for by_seed in batch_runs.values() for r in by_seed]
        ordered = [*stable, *[r for r in round2 if "stages" not in r.job.kwargs], *batches,
                   *[r for r in law if "stages" not in r.job.kwargs],
                   *[r for p in pairs.values() for r in p], *[r for a in arms.values() for p in a.values() for r in p]]
        failed |= _train(ordered, runner, workers, say)

    findings = [transfer.width_finding(the_plan, widths, out), transfer.depth_finding(the_plan, depths, out),
                schedules.schedules_finding(the_plan, comparison, tuned, out),
                scaling_law.law_finding(the_plan, law_sizes, out, tuned["wsd"] if tuned else None),
                batch_size.batch_finding(the_plan, batch_runs, out), dynamics.dynamics_finding(the_plan, pairs, out),
                two_stage.two_stage_finding(the_plan, arms, out),
                schedules.curves_finding(the_plan, comparison, out)]
    results = write_json(out / "results.json", {"plan": the_plan.name, "scale": scale,
                                                "findings": [f.to_json() for f in findings],
                                                "failed_runs": dict(sorted(failed.items()))})
    report = write_report(out, the_plan, findings, failed)
    write_markdown(out, the_plan, findings)
    write_json(out / "timing.json", {"last_invocation_seconds": round(time.monotonic() - started, 1)})
    return Reproduction(out, findings, results, report, failed)

