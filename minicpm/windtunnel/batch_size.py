"""`minicpm windtunnel batch-size`: the optimal batch size against the loss, from runs (paper App. A.2, Fig. 16).

Runs differ in batch.tokens_per_step (and in size). From each run's eval curve, the tokens it needed to first reach
each of a ladder of target losses (linear between evaluations). Per target, the batch size that needs the fewest
tokens: the vertex of a parabola of log tokens against log batch size through the runs that reached it (the paper
fits one per target), or the best run itself when the points do not bracket a minimum. Then bs = a / L^b through
(target, optimal batch) with minicpm.laws.chinchilla.fit_batch_size_law (bootstrap interval over targets).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.plots import figure, log_axis, save_png
from minicpm.laws import BOOTSTRAP_RESAMPLES
from minicpm.rundir import RunDir


@dataclass
class Curve:
    run: str
    batch_tokens: int
    tokens: list[float]
    loss: list[float]


def read_curves(paths: Sequence[str | Path], loss_key: str = "eval_loss") -> list[Curve]:
    """Eval curves of run directories, or of every run under a sweep's runs/ folder."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / "runs").is_dir() and not RunDir(path).is_run():
            runs += sorted(p for p in (path / "runs").iterdir() if RunDir(p).is_run())
        elif RunDir(path).is_run():
            runs.append(path)
        else:
            raise MiniCPMError(f"{path}: not a run directory nor a sweep directory (with runs/)")
    curves = []
    for run in runs:
        config = RunDir(run).read_config_dict()
        batch = (config.get("batch") or {}).get("tokens_per_step")
        if not isinstance(batch, int):
            raise MiniCPMError(f"{RunDir(run).config_file}: no batch.tokens_per_step")
        points = [(r["tokens"], r[loss_key]) for r in RunDir(run).read_metrics()
                  if isinstance(r.get(loss_key), (int, float)) and isinstance(r.get("tokens"), (int, float))
                  and math.isfinite(r[loss_key])]
        if points:
            curves.append(Curve(str(run), batch, [p[0] for p in points], [p[1] for p in points]))
    if len(curves) < 2:
        raise MiniCPMError(f"{len(curves)} run(s) with a {loss_key!r} curve; the batch-size law needs several")
    return curves


def tokens_to_reach(curve: Curve, target: float) -> float | None:
    """The tokens at which the curve first reaches `target` (linear between evaluations), None if it never does."""
    previous = None
    for tokens, loss in zip(curve.tokens, curve.loss):
        if loss <= target:
            if previous is None:
                return float(tokens)
            t0, l0 = previous
            return float(t0 + (tokens - t0) * (l0 - target) / (l0 - loss))
        previous = (tokens, loss)
    return None


def optimal_batch(batches: Sequence[float], tokens: Sequence[float]) -> float:
    """The batch size needing the fewest tokens: the vertex of log tokens = c0 + c1·x + c2·x² (x = log batch) when it
    opens upward and lies within the batches tried, else the best batch tried."""
    x, y = np.log(np.asarray(batches, float)), np.log(np.asarray(tokens, float))
    best = float(batches[int(np.argmin(y))])
    if len(np.unique(x)) < 3:
        return best
    c2, c1, _ = np.polyfit(x, y, 2)
    if c2 <= 0:
        return best
    vertex = -c1 / (2 * c2)
    return float(np.exp(vertex)) if x.min() <= vertex <= x.max() else best


def target_ladder(curves: Sequence[Curve], count: int) -> list[float]:
    """`count` targets, log-spaced from the loss every run reaches to the lowest one that three runs reach."""
    finals = sorted(min(c.loss) for c in curves)
    loosest = max(finals)
    strictest = finals[min(2, len(finals) - 1)]
    if not strictest < loosest:
        raise MiniCPMError("the runs' curves do not overlap in loss; give --targets")
    return [float(v) for v in np.geomspace(loosest, strictest, count + 2)[1:-1]]


@dataclass
class BatchSizeResult:
    points: list[dict]
    fit: object
    written: list[Path]

    def table(self) -> str:
        lines = [f"{'target loss':>12}{'runs':>6}{'optimal batch (tokens)':>24}"]
        for p in self.points:
            lines.append(f"{p['target']:>12.4f}{p['runs']:>6}{p['optimal_batch']:>24,.0f}")
        law, lo_hi = self.fit.law, self.fit.intervals()
        lines.append(f"bs = a / L^b: a = {law.a:.4g} [{lo_hi['a'][0]:.3g}, {lo_hi['a'][1]:.3g}], "
                     f"b = {law.b:.4g} [{lo_hi['b'][0]:.3g}, {lo_hi['b'][1]:.3g}] "
                     f"({self.fit.boot.confidence:.0%} bootstrap interval over targets)")
        return "\n".join(lines)


def batch_size_law(paths: Sequence[str | Path], *, targets: Sequence[float] | None = None, count: int = 6,
                   loss_key: str = "eval_loss", out: str | Path | None = None, bootstrap: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> BatchSizeResult:
    from minicpm.laws.chinchilla import fit_batch_size_law

    curves = read_curves(paths, loss_key)
    targets = sorted(targets, reverse=True) if targets else target_ladder(curves, count)
    points = []
    for target in targets:
        reached = [(c.batch_tokens, t) for c in curves if (t := tokens_to_reach(c, target)) is not None]
        if len({b for b, _ in reached}) < 2:
            continue
        # per batch size, the run that got there first (several model sizes may share a batch size)
        fastest: dict[int, float] = {}
        for batch, tokens in reached:
            fastest[batch] = min(tokens, fastest.get(batch, math.inf))
        batches = sorted(fastest)
        points.append({"target": float(target), "runs": len(reached), "batches": batches,
                       "tokens": [fastest[b] for b in batches],
                       "optimal_batch": optimal_batch(batches, [fastest[b] for b in batches])})
    if len(points) < 3:
        raise MiniCPMError(f"only {len(points)} target loss(es) reached by runs of two or more batch sizes; "
                           f"the law needs 3 (give other --targets, or longer runs)")
    fit = fit_batch_size_law([p["target"] for p in points], [p["optimal_batch"] for p in points],
                             n_boot=bootstrap, seed=seed)
    written = []
    if out is not None:
        out = Path(out)
        written.append(write_atomic(out / "result.json", json.dumps({
            "points": points, "a": fit.law.a, "b": fit.law.b,
            "intervals": fit.intervals(), "rmse_log": fit.rmse_log, "loss_key": loss_key}, indent=1) + "\n"))
        written.append(plot_batch_size(points, fit, loss_key, out / "batch_size.png"))
    return BatchSizeResult(points, fit, written)


def plot_batch_size(points, fit, loss_key: str, path: Path) -> Path:
    fig = figure(10, 4, dpi=90)
    left, right = fig.subplots(1, 2)
    for p in points:
        line, = left.plot(p["batches"], p["tokens"], marker="o", label=f"L = {p['target']:.3f}")
        left.axvline(p["optimal_batch"], color=line.get_color(), linestyle=":", alpha=0.7)
    log_axis(left, "x", ticks={b for p in points for b in p["batches"]})
    log_axis(left, "y")
    left.set(xlabel="batch size (tokens)", ylabel="tokens to reach the target", title="tokens to reach each target loss")
    left.legend(fontsize=7)
    losses = np.array([p["target"] for p in points])
    right.scatter(losses, [p["optimal_batch"] for p in points], label="optimal batch per target")
    grid = np.linspace(losses.min(), losses.max(), 50)
    right.plot(grid, fit.law.batch_tokens(grid), label=f"bs = {fit.law.a:.3g} / L^{fit.law.b:.3g}")
    log_axis(right, "y")
    right.set(xlabel=loss_key, ylabel="batch size (tokens)", title="optimal batch size law")
    right.legend(fontsize=8)
    return save_png(fig, path)
