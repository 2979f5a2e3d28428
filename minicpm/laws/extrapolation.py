"""How well a form of L(N, D) extrapolates in N: fitted without one model size, it predicts that size's runs, with
bootstrap intervals whose coverage of the truth is counted. `scaling fit --holdout largest` holds out the largest
size; `scaling fit --leave-one-size-out` does it for every size and every law offered (laws/variants.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.laws import CONFIDENCE
from minicpm.laws.chinchilla import bootstrap_chinchilla, fit_law, single_threaded_blas
from minicpm.laws.tables import RunTable
from minicpm.laws.variants import VARIANTS

HELD_OUT_BOOTSTRAP = 100
"""Bootstrap resamples behind each held-out interval (a leave-one-size-out table refits sizes x laws x this)."""


@dataclass
class SizePrediction:
    """One size predicted by a law fitted on the other sizes."""

    law: str
    held_n: float
    rows: int
    fit_sizes: int
    ratio: float
    """held N over the largest N fitted: above 1 the law extrapolates, below it interpolates."""
    mean_abs_rel_err: Optional[float] = None
    max_abs_rel_err: Optional[float] = None
    mean_rel_err: Optional[float] = None
    """Signed: below 0 the law predicts a lower loss than measured."""
    coverage: Optional[float] = None
    """Fraction of the held rows whose measured loss lies inside the prediction band (law and scatter)."""
    rel_errs: Optional[list[float]] = None
    """Each held row's signed relative error, in the table's order."""
    skipped: Optional[str] = None

    def to_json(self) -> dict:
        return dict(vars(self))


def subtable(table: RunTable, keep: np.ndarray, source: str) -> RunTable:
    return RunTable(table.params[keep], table.tokens[keep], table.loss[keep], [r for r, k in zip(table.run, keep) if k],
                    None if table.flops is None else table.flops[keep], source=source)


def predict_sizes(table: RunTable, fitted_on: np.ndarray, law: str, *, method: str = "huber", delta: float = 1e-3,
                  n_boot: int = HELD_OUT_BOOTSTRAP, confidence: float = CONFIDENCE,
                  seed: int = 0) -> list[SizePrediction]:
    """Fit `law` on the rows `fitted_on`, predict every other size, and count how many of its runs lie in the
    bootstrap interval of the prediction: one row per held-out size."""
    fitted = subtable(table, fitted_on, f"{table.source} without {int((~fitted_on).sum())} rows")
    largest = np.unique(fitted.params).max() if fitted_on.any() else np.nan
    held_sizes = np.unique(table.params[~fitted_on])
    rows = [SizePrediction(law, float(n), int(np.sum(table.params[~fitted_on] == n)),
                           len(np.unique(fitted.params)), float(n / largest)) for n in held_sizes]
    try:
        fit = fit_law(method, fitted.params, fitted.tokens, fitted.loss, delta=delta, source=fitted.source,
                      variant=law)
        boot = bootstrap_chinchilla(fitted, fit, n_boot=n_boot, confidence=confidence, seed=seed)
    except MiniCPMError as e:
        for row in rows:
            row.skipped = str(e).split(": ", 1)[-1]
        return rows
    # a prediction band for a new run: each bootstrap law times a residual of the fit drawn at random, so the band
    # holds the law's uncertainty and the runs' own scatter about it (a band of the law alone is too narrow for
    # a measured loss, whose noise no refit removes)
    scatter = np.log(fitted.loss) - np.log(fit.law.loss(fitted.params, fitted.tokens))
    drawn = np.exp(np.random.default_rng(seed).choice(scatter, len(boot.laws)))
    for row in rows:
        held = ~fitted_on & (table.params == row.held_n)
        n, d, actual = table.params[held], table.tokens[held], table.loss[held]
        rel = fit.law.loss(n, d) / actual - 1.0
        bands = np.array([boot.interval([b.loss(ni, di) * e for b, e in zip(boot.laws, drawn)])
                          for ni, di in zip(n, d)])
        row.mean_abs_rel_err, row.max_abs_rel_err = float(np.abs(rel).mean()), float(np.abs(rel).max())
        row.mean_rel_err = float(rel.mean())
        row.rel_errs = [float(e) for e in rel]
        row.coverage = float(np.mean((bands[:, 0] <= actual) & (actual <= bands[:, 1])))
    return rows


@single_threaded_blas
def holdout_largest(table: RunTable, law: str, **kwargs) -> SizePrediction:
    """The law fitted without the largest size, predicting it."""
    return predict_sizes(table, table.params < table.params.max(), law, **kwargs)[0]


@single_threaded_blas
def leave_one_size_out(table: RunTable, laws: Sequence[str] = tuple(VARIANTS), **kwargs) -> list[SizePrediction]:
    """Every size held out in turn, for each law (a law needs 3 sizes: a table of k >= 4 sizes gives k rows a law)."""
    sizes = np.unique(table.params)
    if len(sizes) < 4:
        raise MiniCPMError(f"{table.source}: {len(sizes)} model sizes; leaving one out needs at least 4 "
                           f"(the law needs 3)")
    return [predict_sizes(table, table.params != n, law, **kwargs)[0] for law in laws for n in sizes]


def _pct(value: Optional[float], signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.2%}" if signed else f"{value:.2%}")


def format_held_out(rows: Sequence[SizePrediction], confidence: float = CONFIDENCE) -> str:
    """One line per (law, held size), then per law the mean over the sizes it extrapolates to (ratio > 1)."""
    out = [f"{'law':<17}{'held N':>10}{'x fitted':>9}{'runs':>6}{'mean |err|':>12}{'max |err|':>11}"
           f"{'mean err':>10}{f'in {confidence:.0%} band':>14}"]
    for r in rows:
        if r.skipped:
            out.append(f"{r.law:<17}{r.held_n:>10.3g}{r.ratio:>9.2f}{r.rows:>6}  skipped ({r.skipped})")
            continue
        out.append(f"{r.law:<17}{r.held_n:>10.3g}{r.ratio:>9.2f}{r.rows:>6}{_pct(r.mean_abs_rel_err):>12}"
                   f"{_pct(r.max_abs_rel_err):>11}{_pct(r.mean_rel_err, True):>10}{_pct(r.coverage):>14}")
    laws = list(dict.fromkeys(r.law for r in rows))
    if len(rows) > len(laws):
        out.append("extrapolating (held N above every fitted N), by law:")
        for law in laws:
            ext = [r for r in rows if r.law == law and r.ratio > 1 and not r.skipped]
            every = [r for r in rows if r.law == law and not r.skipped]
            if every:
                out.append(f"  {law:<17} mean |err| {_pct(_mean(ext, 'mean_abs_rel_err'))} extrapolating, "
                           f"{_pct(_mean(every, 'mean_abs_rel_err'))} over all held sizes; "
                           f"in band {_pct(_mean(every, 'coverage'))}")
    return "\n".join(out)


def _mean(rows: Sequence[SizePrediction], key: str) -> Optional[float]:
    values = [getattr(r, key) for r in rows]
    return float(np.mean(values)) if values else None
