"""Parts 1 and 2 of `minicpm reproduce`: does the best learning rate stay put as the model grows?

Part 1, across width (paper §3, Fig. 3): a log₂ grid of learning rates at each width, every point at every seed,
under μP (dim_model_base = the smallest width), standard parametrisation (SP: dim_model_base = the width, so m = 1
and no μP rule applies) and μP with the tied embedding in the hidden-matrix group (`optim.embedding_in_2d_group`:
lr/m for the embedding too, the literal reading of Table 7). At the smallest width m = 1 and the three are one model,
trained once.

Part 2, across depth (beyond the paper): the same at one width over depths, with MiniCPM's residual
× scale_depth/√L and with CompleteP's residual × L_base/L (Dey et al. 2025, `model.depth_scaling: completep`).

Per seed, the optimum is the vertex of the parabola through the best grid point and its neighbours (log₂ lr); the
verdict is the interval over seeds of its shift from the smallest to the largest size, against one ×2 step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from minicpm.laws.verdict import FAILS, HOLDS, INCONCLUSIVE, optimum_moves_at_most
from minicpm.reproduce.findings import Finding, not_measured
from minicpm.reproduce.plan import Plan
from minicpm.reproduce.runs import Run, batch, final_loss, lr, optimum_log2_lr, shape, single_run

WIDTH_ARMS = {"mup": "μP", "sp": "SP", "mup-embedding-2d": "μP, embedding lr/m"}
DEPTH_ARMS = {"minicpm": "scale_depth/√L (MiniCPM)", "completep": "1/L (CompleteP)"}
PAPER_WIDTH = ("Under μP the best learning rate stays the same from the 0.036B proxy to the 2B models (§3, Fig. 3: "
               "widths 256 to 2304, the optimum near 0.01 at every width); without μP it would move.")
PAPER_DEPTH = ("Not in the paper (it scales depth by scale_depth/√L, Table 7). CompleteP (Dey et al. 2025) argues "
               "that 1/L, with its learning-rate and initialisation rules, keeps the optimum in place across depth "
               "where 1/√L does not.")


@dataclass
class Grid:
    """One arm's grid: {size: {seed: {log2 lr: run}}}."""

    arm: str
    runs: dict[int, dict[int, dict[int, Run]]]

    def losses(self, size: int, seed: int) -> dict[int, float | None]:
        return {k: final_loss(r.run_dir, r.final_step) for k, r in self.runs[size][seed].items()}


def _schedule(plan: Plan) -> list[str]:
    steps = plan.transfer_steps
    return ["schedule.kind=wsd", f"schedule.total_steps={steps}", f"schedule.decay_steps={max(1, steps // 10)}",
            *batch(plan.tokens_per_step)]


def width_grids(plan: Plan, out: Path, recipe: Path) -> list[Grid]:
    base = plan.base_width
    grids = {arm: Grid(arm, {}) for arm in WIDTH_ARMS}
    base_runs: dict[tuple[int, int], Run] = {}  # m = 1 at the base width: one model under every rule, trained once

    def train(arm: str, width: int, seed: int, k: int) -> Run:
        name = f"width/{arm}/w{width}/lr{k}-s{seed}"
        extra = ["optim.embedding_in_2d_group=true"] if arm == "mup-embedding-2d" else []
        return single_run(name, out / name, recipe, [
            *shape(width, plan.transfer_depth, base_width=width if arm == "sp" else base), *extra, lr(k),
            f"run.seed={seed}", *_schedule(plan)], plan.transfer_steps)

    for width in plan.widths:
        for arm in WIDTH_ARMS:
            if arm == "mup-embedding-2d" and width not in (base, *plan.embedding_widths):
                continue
            for seed in plan.transfer_seeds:
                for k in plan.arm_log2_lrs(arm):
                    if width == base:
                        run = base_runs.get((seed, k)) or base_runs.setdefault((seed, k), train("mup", base, seed, k))
                    else:
                        run = train(arm, width, seed, k)
                    grids[arm].runs.setdefault(width, {}).setdefault(seed, {})[k] = run
    return list(grids.values())


def depth_grids(plan: Plan, out: Path, recipe: Path) -> list[Grid]:
    grids = []
    for rule in DEPTH_ARMS:
        grid = Grid(rule, {})
        extra = ["model.depth_scaling=completep", f"model.depth_base={plan.depths[0]}"] if rule == "completep" else []
        for depth in plan.depths:
            for seed in plan.transfer_seeds:
                for k in plan.depth_log2_lrs:
                    name = f"depth/{rule}/d{depth}/lr{k}-s{seed}"
                    grid.runs.setdefault(depth, {}).setdefault(seed, {})[k] = single_run(
                        name, out / name, recipe, [*shape(plan.depth_width, depth, base_width=plan.base_width),
                                                   *extra, lr(k), f"run.seed={seed}", *_schedule(plan)],
                        plan.transfer_steps)
        grids.append(grid)
    return grids


def runs_of(grids: list[Grid]) -> list[Run]:
    seen: dict[Path, Run] = {}
    for grid in grids:
        for by_seed in grid.runs.values():
            for by_lr in by_seed.values():
                for run in by_lr.values():
                    seen.setdefault(run.run_dir, run)
    return list(seen.values())


def _arm_table(grid: Grid, seeds) -> dict:
    """Per size: the mean loss at each learning rate over seeds, and each seed's optimum."""
    table = {}
    for size in sorted(grid.runs):
        per_seed = {s: grid.losses(size, s) for s in seeds}
        lrs = sorted(set().union(*per_seed.values()))
        mean = {}
        for k in lrs:
            values = [per_seed[s].get(k) for s in seeds]
            mean[k] = None if any(v is None or not math.isfinite(v) for v in values) else sum(values) / len(values)
        optima = {s: optimum_log2_lr(per_seed[s]) for s in seeds}
        table[size] = {"mean_loss": {str(k): v for k, v in mean.items()},
                       "optimum_log2_lr": {str(s): o[0] for s, o in optima.items()},
                       "at_grid_edge": {str(s): o[1] for s, o in optima.items()}}
    return table


def shift_verdict(table: dict, label: str, sizes: tuple[int, int], seeds, unit: str):
    """The claim that the optimum moves at most one ×2 step between the two sizes; inconclusive whatever the
    interval when an optimum lies at its grid's edge (the true one may lie beyond it)."""
    first, last = table[sizes[0]], table[sizes[1]]
    if any(row["optimum_log2_lr"][str(s)] is None for row in (first, last) for s in seeds):
        return None
    verdict = optimum_moves_at_most([2.0 ** first["optimum_log2_lr"][str(s)] for s in seeds],
                                    [2.0 ** last["optimum_log2_lr"][str(s)] for s in seeds], doublings=1.0,
                                    claim=f"{label}: the optimum moves at most one x2 step from {unit} {sizes[0]} "
                                          f"to {sizes[1]}")
    if any(row["at_grid_edge"][str(s)] for row in (first, last) for s in seeds):
        return dataclasses.replace(verdict, outcome=INCONCLUSIVE,
                                   threshold=verdict.threshold + " (an optimum at its grid's edge)")
    return verdict


def _missing(grids: list[Grid]) -> list[str]:
    return sorted({str(r.job.name) for r in runs_of(grids) if final_loss(r.run_dir, r.final_step) is None})


def width_finding(plan: Plan, grids: list[Grid], out: Path) -> Finding:
    title = "μP transfer across width"
    seeds = plan.transfer_seeds
    missing = _missing(grids)
    tables = {g.arm: _arm_table(g, seeds) for g in grids}
    sizes = (plan.widths[0], plan.widths[-1])
    verdicts = {arm: shift_verdict(tables[arm], WIDTH_ARMS[arm], sizes, seeds, "width") for arm in WIDTH_ARMS}
    if verdicts["mup"] is None:
        return not_measured(1, "width", title, PAPER_WIDTH, "the μP grid did not finish", missing)
    finding = Finding(1, "width", title, PAPER_WIDTH, [v for v in verdicts.values() if v is not None],
                      numbers={"widths": list(plan.widths),
                               "log2_lrs": {arm: list(plan.arm_log2_lrs(arm)) for arm in WIDTH_ARMS},
                               "seeds": list(seeds), "base_width": plan.base_width, "arms": tables},
                      figure=plot_grids(grids, tables, WIDTH_ARMS, "width", out / "width" / "width.png", out),
                      missing=missing)
    mup, sp = verdicts["mup"], verdicts["sp"]
    if sp is not None and mup.outcome == HOLDS and sp.outcome == HOLDS:
        finding.notes.append(f"SP's optimum also stays within one ×2 step over this {sizes[1] // sizes[0]}× range: "
                             f"at these widths the vocabulary matrices (kept at the base lr in both) weigh as much as "
                             f"the hidden ones, so the contrast μP is built for is small here.")
    if sp is not None and sp.outcome == FAILS:
        finding.notes.append(f"SP's optimum moves by {sp.estimate:+.2f} doublings: the shift μP removes shows.")
    embedding = verdicts["mup-embedding-2d"]
    if embedding is not None:
        low, high = embedding.interval
        tighter = "classic μP (embedding at the base lr)" if abs(mup.estimate) <= abs(embedding.estimate) else \
            "the embedding at lr/m"
        finding.notes.append(f"Embedding in the hidden group (lr/m, `optim.embedding_in_2d_group`): {embedding.outcome}, "
                             f"its optimum moves {embedding.estimate:+.2f} [{low:+.2f}, {high:+.2f}] doublings against "
                             f"μP's {mup.estimate:+.2f}: {tighter} keeps the optimum closer in place.")
    edges = [f"{arm} width {w}" for arm, t in tables.items() for w, row in t.items()
             if any(row["at_grid_edge"].values())]
    if edges:
        finding.notes.append(f"optimum at the grid's edge (the true one may lie beyond): {', '.join(edges)}")
    return finding


def depth_finding(plan: Plan, grids: list[Grid], out: Path) -> Finding:
    title = "Learning-rate transfer across depth"
    seeds = plan.transfer_seeds
    missing = _missing(grids)
    tables = {g.arm: _arm_table(g, seeds) for g in grids}
    sizes = (plan.depths[0], plan.depths[-1])
    verdicts = [v for arm in DEPTH_ARMS
                if (v := shift_verdict(tables[arm], DEPTH_ARMS[arm], sizes, seeds, "depth")) is not None]
    if not verdicts:
        return not_measured(2, "depth", title, PAPER_DEPTH, "the depth grids did not finish", missing)
    finding = Finding(2, "depth", title, PAPER_DEPTH, verdicts,
                      numbers={"depths": list(plan.depths), "width": plan.depth_width,
                               "log2_lrs": list(plan.depth_log2_lrs), "seeds": list(seeds), "arms": tables},
                      figure=plot_grids(grids, tables, DEPTH_ARMS, "depth", out / "depth" / "depth.png", out),
                      missing=missing)
    best = min(verdicts, key=lambda v: abs(v.estimate))
    finding.notes.append(f"Smaller shift: {best.claim.split(':')[0]} ({best.estimate:+.2f} doublings).")
    return finding


def plot_grids(grids: list[Grid], tables: dict, labels: dict, unit: str, path: Path, out: Path) -> str:
    """Loss against learning rate (mean over seeds), one line per size, a panel per arm (paper Fig. 3)."""
    from minicpm.plots import figure, save_png

    fig = figure(4.6 * len(grids), 3.8, dpi=100)
    axes = fig.subplots(1, len(grids), squeeze=False, sharey=True)[0]
    for ax, grid in zip(axes, grids):
        table = tables[grid.arm]
        for i, size in enumerate(sorted(table)):
            points = sorted((2.0 ** int(k), v) for k, v in table[size]["mean_loss"].items() if v is not None)
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i}", label=f"{unit} {size}")
            for opt in table[size]["optimum_log2_lr"].values():
                if opt is not None:
                    ax.axvline(2.0 ** opt, color=f"C{i}", ls=":", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="learning rate (dotted: each seed's optimum)", title=labels[grid.arm])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss (nats/token), mean over seeds")
    save_png(fig, path)
    return str(path.relative_to(out))
