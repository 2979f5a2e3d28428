"""Part 5 of `minicpm reproduce`: the optimal batch size against the loss (paper §3.2, App. A.2). Runs that differ in
batch size alone train the same number of tokens (cosine to 10%, the paper's set-up at lr 0.01; here the tuned
cosine learning rate); per target loss the batch that reaches it in the fewest tokens; bs = a / L^b fitted through
them (minicpm.windtunnel.batch_size), beside the paper's 1.21e9 / L^6.24.
"""

from __future__ import annotations

from pathlib import Path

from minicpm.errors import MiniCPMError
import numpy as np

from minicpm.laws.verdict import at_most
from minicpm.reproduce.findings import Finding, not_measured
from minicpm.reproduce.plan import Plan
from minicpm.reproduce.runs import Run, batch, final_loss, lr, shape
from minicpm.jobs.job import Job, train_recipe

PAPER_BATCH = ("§3.2 / App. A.2: the optimal batch grows as the loss falls, bs = 1.21e9 / L^6.24 tokens (C4 loss of "
               "0.009B-0.17B models; L = 2.5 gives 3.98M).")
PAPER_A, PAPER_B = 1.21e9, 6.24


TARGETS = 8
EARLIEST = 0.25
"""Targets start at the highest loss any run shows after this share of its tokens (past warmup's transient)."""


def batch_runs(plan: Plan, out: Path, recipe: Path, lr_log2: int) -> dict[int, list[Run]]:
    """{seed: a run per batch size}, each training batch_run_tokens."""
    runs: dict[int, list[Run]] = {}
    for seed in plan.seeds:
        for tokens in plan.batch_sizes:
            steps = max(plan.warmup_steps + 2, round(plan.batch_run_tokens / tokens))
            name = f"batch/s{seed}/b{tokens}"
            overrides = [*shape(plan.schedule_width, plan.schedule_depth, base_width=plan.base_width),
                         *batch(tokens), lr(lr_log2), "schedule.kind=cosine", f"schedule.total_steps={steps}",
                         "schedule.floor=0.1", "schedule.cosine_period=null", f"run.seed={seed}",
                         f"run.eval_every={max(1, steps // plan.batch_evals)}", "run.checkpoint_every=0",
                         "run.keep_last=1"]
            runs.setdefault(seed, []).append(Run(Job(name, out / name, {
                "config": str(recipe), "overrides": overrides, "run_dir": str(out / name)}, work=train_recipe), steps))
    return runs


def targets(run_dirs: list[Path]) -> list[float]:
    """Target losses spread over the runs' shared range: from the highest loss a run shows after EARLIEST of its
    tokens (every run reaches it) to the third-lowest final loss (three runs reach it): the optimal batch is
    compared over as wide a span of loss as the runs allow (the law is about its change with the loss)."""
    from minicpm.windtunnel.batch_size import read_curves

    curves = read_curves(run_dirs)
    highest = max(next(loss for tokens, loss in zip(c.tokens, c.loss) if tokens >= EARLIEST * c.tokens[-1])
                  for c in curves)
    finals = sorted(min(c.loss) for c in curves)
    lowest = finals[min(2, len(finals) - 1)]
    if not lowest < highest:
        raise MiniCPMError("the runs share no range of loss")
    return [float(v) for v in np.geomspace(highest, lowest, TARGETS + 2)[1:-1]]


def batch_finding(plan: Plan, runs: dict[int, list[Run]], out: Path) -> Finding:
    from minicpm.windtunnel.batch_size import batch_size_law

    title = "The batch-size law"
    missing = [r.job.name for by_seed in runs.values() for r in by_seed if final_loss(r.run_dir, r.final_step) is None]
    laws = {}
    for seed, by_seed in runs.items():
        done = [r.run_dir for r in by_seed if r.job.name not in missing]
        if len(done) < 3:
            continue
        try:
            laws[seed] = batch_size_law(done, targets=targets(done), out=out / "batch" / f"s{seed}")
        except MiniCPMError as e:
            missing.append(f"seed {seed}: no law ({str(e).replace(str(out) + '/', '')})")  # paths relative to OUT
    if len(laws) < 2:
        return not_measured(5, "batch", title, PAPER_BATCH, "fewer than two seeds gave a law", missing)
    exponents = [laws[s].fit.law.b for s in sorted(laws)]
    verdict = at_most([-b for b in exponents], [0.0] * len(exponents),
                      claim="the optimal batch grows as the loss falls: -b of bs = a / L^b, per seed")
    first = min(laws)
    finding = Finding(5, "batch", title, PAPER_BATCH, [verdict],
                      figure=str((out / "batch" / f"s{first}" / "batch_size.png").relative_to(out)), missing=missing,
                      numbers={"b_per_seed": {str(s): laws[s].fit.law.b for s in sorted(laws)},
                               "a_per_seed": {str(s): laws[s].fit.law.a for s in sorted(laws)},
                               "points": {str(s): laws[s].points for s in sorted(laws)},
                               "batch_sizes": list(plan.batch_sizes), "run_tokens": plan.batch_run_tokens,
                               "paper": {"a": PAPER_A, "b": PAPER_B}})
    span = laws[first].points
    low, high = span[-1]["target"], span[0]["target"]
    finding.notes.append(f"b per seed: {', '.join(f'{b:.3g}' for b in exponents)} over target losses {high:.3f} to "
                         f"{low:.3f}; the paper's b = {PAPER_B} would move the optimum {(high / low) ** PAPER_B:.2f}x "
                         f"over this span. Its a is for C4 loss of its tokenizer: only the sign and rough size of b "
                         f"carry over.")
    return finding
