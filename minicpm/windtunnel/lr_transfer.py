"""`minicpm windtunnel lr-transfer`: does the best learning rate transfer across widths (paper §3, Fig. 3)?

For each parametrisation (μP: dim_model_base fixed at the base width; SP: dim_model_base = the width, so the width
multiplier is 1 and no μP rule applies) and each width, a grid sweep over a log₂ learning-rate grid, every trial an
ordinary run directory (minicpm/experiments/sweep.py). The width sets hidden_size, intermediate_size (2.5×) and the
head counts (width / head_dim); the recipe and its overrides set everything else.

    DIR/{mup,sp}/w{width}/           one sweep each (runs/, trials.csv, study.journal)
    DIR/lr_transfer.png              loss against learning rate, one line per width, a panel per parametrisation
    DIR/result.json                  the losses, the optimum per width and its shift in ×2 steps

With several --seeds each learning rate is trained once per seed (run.seed: the initialisation and the data
order) and its loss is the mean over them (None when any seed failed: a divergence at that rate is not averaged
away). An optimum at the grid's first or last rate is marked: the true optimum may lie outside the grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minicpm.errors import MiniCPMError
from minicpm.model.shapes import WidthRule
from minicpm.sweep.spec import Param, SweepSpec
from minicpm.files import write_atomic
from minicpm.plots import figure, save_png

LABELS = {"mup": "μP", "sp": "SP"}


def width_overrides(width: int, *, head_dim: int, base_width: int, parametrisation: str) -> list[str]:
    return [*WidthRule(head_dim=head_dim).overrides(width),
            f"model.dim_model_base={base_width if parametrisation == 'mup' else width}"]


@dataclass
class Optimum:
    width: int
    lr: float | None
    loss: float | None
    shift: int | None  # log₂(optimum / the smallest width's optimum)
    at_edge: bool = False  # the grid's first or last learning rate: the optimum may lie beyond it


@dataclass
class LrTransferResult:
    losses: dict[str, dict[int, dict[float, float | None]]]
    optima: dict[str, list[Optimum]]
    written: list[Path]

    def table(self) -> str:
        lines = [f"{'':4}{'width':>7}{'best lr':>12}{'loss':>10}{'shift (x2 steps)':>18}"]
        for name, optima in self.optima.items():
            for o in optima:
                lr = f"2^{math.log2(o.lr):.0f}" if o.lr else "-"
                loss = f"{o.loss:.4f}" if o.loss is not None else "-"
                shift = f"{o.shift:+d}" if o.shift is not None else "-"
                edge = "  (grid edge)" if o.at_edge else ""
                lines.append(f"{LABELS[name]:4}{o.width:>7}{lr:>12}{loss:>10}{shift:>18}{edge}")
        for name, optima in self.optima.items():
            shifts = [o.shift for o in optima if o.shift is not None]
            if shifts:
                lines.append(f"{LABELS[name]}: the optimum moves by {max(abs(s) for s in shifts)} x2 step(s) over "
                             f"widths {optima[0].width}-{optima[-1].width}")
        return "\n".join(lines)


def optima_of(losses: dict[int, dict[float, float | None]]) -> list[Optimum]:
    out: list[Optimum] = []
    first = None
    for width in sorted(losses):
        done = {lr: loss for lr, loss in losses[width].items() if loss is not None and math.isfinite(loss)}
        if not done:
            out.append(Optimum(width, None, None, None))
            continue
        lr = min(done, key=done.get)
        first = first or lr
        grid = sorted(losses[width])
        out.append(Optimum(width, lr, done[lr], round(math.log2(lr / first)), lr in (grid[0], grid[-1])))
    return out


def mean_over_seeds(rows: Sequence[dict]) -> dict[float, float | None]:
    """Per learning rate, the mean metric of its trials (one per seed); None when any of them has no value."""
    by_lr: dict[float, list] = {}
    for row in rows:
        by_lr.setdefault(float(row["params"]["optim.lr"]), []).append(row["value"])
    return {lr: (None if any(v is None for v in values) else sum(values) / len(values))
            for lr, values in sorted(by_lr.items())}


def lr_transfer(recipe: str | Path, overrides: Sequence[str], *, widths: Sequence[int], log2_lrs: Sequence[int],
                out: str | Path, head_dim: int = 16, base_width: int | None = None,
                parametrisations: Sequence[str] = ("mup", "sp"), metric: str = "eval_loss", workers: int = 1,
                seeds: Sequence[int] = (0,), echo=print) -> LrTransferResult:
    from minicpm.sweep.sweep import Sweep, check_space_keys

    recipe = Path(recipe)
    if not recipe.is_file():
        raise MiniCPMError(f"{recipe}: no such config file")
    widths = WidthRule(head_dim=head_dim).widths_to_compare(widths)
    if not log2_lrs:
        raise MiniCPMError("--log2-lr: give at least one exponent")
    base_width = base_width or widths[0]
    lrs = tuple(2.0 ** k for k in sorted(set(log2_lrs)))
    seeds = tuple(sorted(set(seeds)))
    if not seeds:
        raise MiniCPMError("--seeds: give at least one seed")
    space = {"optim.lr": Param("optim.lr", choices=lrs)}
    if len(seeds) > 1:
        space["run.seed"] = Param("run.seed", choices=seeds)
    out = Path(out)
    sweeps = []
    for name in parametrisations:
        for width in widths:
            spec = SweepSpec(path=recipe, config=recipe.resolve(),
                             overrides=[*overrides, *width_overrides(width, head_dim=head_dim, base_width=base_width,
                                                                     parametrisation=name)],
                             space=space, sampler="grid", trials=len(lrs) * len(seeds),
                             metric=metric, workers=workers, name=f"lr-transfer-{name}-w{width}")
            check_space_keys(spec)
            sweeps.append((name, width, spec))
    losses: dict[str, dict[int, dict[float, float | None]]] = {name: {} for name in parametrisations}
    for name, width, spec in sweeps:
        echo(f"{LABELS[name]} width {width}: {len(lrs)} learning rates")
        result = Sweep(spec, out / name / f"w{width}", echo=echo).run()
        losses[name][width] = mean_over_seeds(result.rows)
    optima = {name: optima_of(losses[name]) for name in parametrisations}
    written = [write_atomic(out / "result.json", json.dumps({
        "widths": widths, "learning_rates": list(lrs), "seeds": list(seeds), "base_width": base_width, "metric": metric,
        "losses": {n: {str(w): {repr(lr): v for lr, v in per.items()} for w, per in by_w.items()}
                   for n, by_w in losses.items()},
        "optima": {n: [o.__dict__ for o in opt] for n, opt in optima.items()}}, indent=1) + "\n")]
    written.append(plot_lr_transfer(losses, optima, metric, out / "lr_transfer.png"))
    return LrTransferResult(losses, optima, written)


def plot_lr_transfer(losses, optima, metric: str, path: Path) -> Path:
    fig = figure(5 * len(losses), 3.8, dpi=90)
    axes = fig.subplots(1, len(losses), squeeze=False, sharey=True)
    for ax, (name, by_width) in zip(axes[0], losses.items()):
        for width in sorted(by_width):
            points = sorted((lr, v) for lr, v in by_width[width].items() if v is not None and math.isfinite(v))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"width {width}")
        for o in optima[name]:
            if o.lr is not None:
                ax.scatter([o.lr], [o.loss], marker="*", s=120, color="black", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_title(LABELS[name])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(metric)
    return save_png(fig, path)
