"""`minicpm windtunnel search`: Bayesian (TPE) search of the μP hyper-parameters on a small proxy (paper App. A.1).

The paper searched scale_emb, scale_depth, init_std and the learning rate on a 0.009B proxy trained for D = 10N
tokens and found scale_emb 12, scale_depth 1.4, init_std 0.1, lr 0.01 (its Fig. 14 shows the ranges, the text does
not). Here the proxy is any training recipe: N is its non-embedding parameter count (the paper's scaling-law N),
schedule.total_steps is set to reach D = tokens_per_param · N, and a TPE sweep (minicpm/experiments/sweep.py) runs
the trials, each an ordinary run directory, so a killed search re-run resumes.

    DIR/runs/trial_NNNN/   DIR/trials.csv   DIR/study.journal    the sweep
    DIR/search.png         the metric against each hyper-parameter (the best trial starred)
    DIR/importance.png     each hyper-parameter's importance (optuna.importance, fANOVA)
    DIR/result.json        N, D, steps, the best point, every trial, the importances
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from minicpm.errors import MiniCPMError
from minicpm.sweep.spec import Param, SweepSpec
from minicpm.files import write_atomic
from minicpm.plots import figure, log_axis, save_png

# name shown -> (config key, low, high); all searched on a log scale around the paper's optimum
DEFAULT_SPACE: dict[str, tuple[str, float, float]] = {
    "scale_emb": ("model.scale_emb", 1.0, 64.0),
    "scale_depth": ("model.scale_depth", 0.25, 8.0),
    "init_std": ("model.initializer_range", 0.01, 1.0),
    "lr": ("optim.lr", 1e-3, 0.1),
}
PAPER_OPTIMUM = {"scale_emb": 12.0, "scale_depth": 1.4, "init_std": 0.1, "lr": 0.01}


def parse_ranges(items: Sequence[str]) -> dict[str, tuple[float, float]]:
    """`--range lr=0.002:0.05` items -> {name: (low, high)}; names are DEFAULT_SPACE's."""
    out = {}
    for item in items:
        name, sep, bounds = item.partition("=")
        low, colon, high = bounds.partition(":")
        if not sep or not colon or name not in DEFAULT_SPACE:
            raise MiniCPMError(f"--range {item!r}: expected NAME=LOW:HIGH with NAME one of "
                               f"{', '.join(DEFAULT_SPACE)}")
        try:
            lo, hi = float(low), float(high)
        except ValueError:
            raise MiniCPMError(f"--range {item!r}: LOW and HIGH must be numbers") from None
        if not (0 < lo < hi and math.isfinite(hi)):
            raise MiniCPMError(f"--range {item!r}: need 0 < LOW < HIGH (the search is on a log scale)")
        out[name] = (lo, hi)
    return out


def proxy_steps(recipe: Path, overrides: Sequence[str], tokens_per_param: float) -> tuple[int, int, int]:
    """(N non-embedding parameters, D tokens wanted, optimizer steps to reach D at the recipe's batch)."""
    from minicpm.train.config import load_config, model_config

    cfg = load_config(recipe, list(overrides))
    n = model_config(cfg).non_embedding_params()
    tokens = int(round(tokens_per_param * n))
    steps = max(1, math.ceil(tokens / cfg.batch.tokens_per_step))
    return n, tokens, steps


@dataclass
class SearchResult:
    n: int
    tokens: int
    steps: int
    best: dict[str, Any] | None
    importances: dict[str, float]
    rows: list[dict[str, Any]]
    written: list[Path]

    def table(self) -> str:
        lines = [f"proxy: N = {self.n:,} non-embedding parameters, D = {self.tokens:,} tokens ({self.steps} steps)"]
        done = sum(1 for r in self.rows if r["state"] == "complete")
        lines.append(f"trials: {done} complete of {len(self.rows)}")
        if self.best:
            lines.append(f"{'':12}{'best':>12}{'paper':>10}{'importance':>12}")
            for name, (key, _, _) in DEFAULT_SPACE.items():
                if key in self.best["params"]:
                    importance = self.importances.get(name)
                    lines.append(f"{name:12}{self.best['params'][key]:>12.4g}{PAPER_OPTIMUM[name]:>10g}"
                                 f"{'-' if importance is None else format(importance, '.2f'):>12}")
            lines.append(f"best {self.best['metric']}: {self.best['value']:.4f} (trial {self.best['number']}, "
                         f"{self.best['run_dir']})")
        return "\n".join(lines)


def search(recipe: str | Path, overrides: Sequence[str], *, out: str | Path, trials: int = 16,
           tokens_per_param: float = 10.0, ranges: dict[str, tuple[float, float]] | None = None,
           params: Sequence[str] = tuple(DEFAULT_SPACE), metric: str = "eval_loss", workers: int = 1,
           threads: int = 1, seed: int = 0, echo=print) -> SearchResult:
    from minicpm.sweep.sweep import Sweep, check_space_keys

    recipe = Path(recipe)
    if not recipe.is_file():
        raise MiniCPMError(f"{recipe}: no such config file")
    if trials < 1:
        raise MiniCPMError(f"--trials must be positive, got {trials}")
    if not tokens_per_param > 0:
        raise MiniCPMError(f"--tokens-per-param must be positive, got {tokens_per_param}")
    unknown = [p for p in params if p not in DEFAULT_SPACE]
    if unknown or not params:
        raise MiniCPMError(f"--params: {', '.join(unknown) or 'none given'}: choose from {', '.join(DEFAULT_SPACE)}")
    ranges = {**{k: (lo, hi) for k, (_, lo, hi) in DEFAULT_SPACE.items()}, **(ranges or {})}
    n, tokens, steps = proxy_steps(recipe, overrides, tokens_per_param)
    space = {DEFAULT_SPACE[name][0]: Param(DEFAULT_SPACE[name][0], low=float(ranges[name][0]),
                                           high=float(ranges[name][1]), log=True) for name in params}
    spec = SweepSpec(path=recipe, config=recipe.resolve(), overrides=[*overrides, f"schedule.total_steps={steps}"],
                     space=space, sampler="tpe", trials=trials, metric=metric, workers=workers, threads=threads,
                     seed=seed, name="windtunnel-search")
    check_space_keys(spec)
    echo(f"proxy: N = {n:,} non-embedding parameters; D = {tokens_per_param:g} N = {tokens:,} tokens = {steps} steps")
    out = Path(out)
    sweep = Sweep(spec, out, echo=echo)
    result = sweep.run()
    importances = param_importances(sweep.study, space)
    best = None
    if result.best:
        best = {**result.best, "metric": metric}
    names = {DEFAULT_SPACE[p][0]: p for p in params}
    written = [write_atomic(out / "result.json", json.dumps({
        "n_non_embedding": n, "tokens": tokens, "tokens_per_param": tokens_per_param, "steps": steps,
        "metric": metric, "space": {names[k]: {"key": k, "low": p.low, "high": p.high, "log": True}
                                    for k, p in space.items()},
        "best": best, "paper_optimum": PAPER_OPTIMUM, "importances": importances,
        "trials": result.rows}, indent=1) + "\n")]
    complete = [r for r in result.rows if r["state"] == "complete"]
    if complete:
        written.append(plot_search(complete, space, names, metric, best, out / "search.png"))
    if importances:
        written.append(plot_importances(importances, out / "importance.png"))
    return SearchResult(n, tokens, steps, best, importances, result.rows, written)


def param_importances(study, space: dict[str, Param]) -> dict[str, float]:
    """optuna.importance over the completed trials ({} with fewer than two: nothing to attribute), by short name."""
    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    names = {v[0]: k for k, v in DEFAULT_SPACE.items()}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    values = optuna.importance.get_param_importances(study, evaluator=evaluator, params=list(space))
    return {names[key]: float(value) for key, value in values.items()}


def plot_search(rows, space: dict[str, Param], names: dict[str, str], metric: str, best, path: Path) -> Path:
    fig = figure(3.6 * len(space), 3.4, dpi=90)
    axes = fig.subplots(1, len(space), squeeze=False, sharey=True)
    values = [r["value"] for r in rows]
    for ax, key in zip(axes[0], space):
        ax.scatter([r["params"][key] for r in rows], values, s=18, c=range(len(rows)), cmap="viridis")
        if best:
            ax.scatter([best["params"][key]], [best["value"]], marker="*", s=160, color="red", zorder=3)
        ax.axvline(PAPER_OPTIMUM[names[key]], color="gray", ls=":", lw=1)
        log_axis(ax)
        ax.set_xlabel(f"{names[key]} ({key})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(metric)
    fig.suptitle("TPE search on the proxy (colour: trial order; star: best; dotted: the paper's value)", fontsize=9)
    return save_png(fig, path)


def plot_importances(importances: dict[str, float], path: Path) -> Path:
    names = sorted(importances, key=importances.get)
    fig = figure(5, 0.5 * len(names) + 1.2, dpi=90)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, share of the metric's variance)")
    ax.set_xlim(0, 1)
    return save_png(fig, path)
