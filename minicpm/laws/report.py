"""What `minicpm scaling fit / fit-curve / predict-curve` show: the analysis of a table of runs, as a table for
people, a JSON object for programs, and PNG plots (minicpm/plots.py)."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.laws import BOOTSTRAP_RESAMPLES, CONFIDENCE
from minicpm.plots import figure, save_png
from minicpm.laws.curves import FORMULAS, CurveFit, predict_loss, prediction_steps, warmup_end
from minicpm.laws.chinchilla import (PAPER_NAMES, PARAMS, BatchSizeFit, Bootstrap, ChinchillaFit, Envelope, HeldOut,
                                     IsoflopFit, bootstrap_chinchilla, fit_envelope, fit_isoflop, fit_law,
                                     held_out_checks)
from minicpm.laws.tables import Curve, RunTable, lr_per_step
from minicpm.laws.variants import DEFAULT_LAW, law_variant

LAW_TEXT = "L(N, D) = E + A/N^alpha + B/D^beta"



@dataclass
class ScalingReport:
    table: RunTable
    fit: ChinchillaFit
    boot: Bootstrap
    held_out: list[HeldOut]
    budgets: list[float]
    predictions: list[tuple[float, float]]
    isoflop: IsoflopFit
    envelope: Optional[Envelope]
    envelope_note: Optional[str]


def default_law(method: str) -> str:
    """The form of L(N, D) a fit by `method` uses unless told: the paper's least squares fits its own law."""
    return "chinchilla" if method == "lsq" else DEFAULT_LAW


def default_budgets(table: RunTable) -> list[float]:
    """Four decades of compute from the largest run's budget up: where a plan is usually wanted."""
    top = math.ceil(math.log10(table.compute().max()))
    return [10.0 ** (top + k) for k in range(4)]


def analyse_table(table: RunTable, *, delta: float = 1e-3, n_boot: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                  seed: int = 0, budgets: Optional[Sequence[float]] = None,
                  predictions: Sequence[tuple[float, float]] = (), isoflop_tol: float = 0.05,
                  progress: bool = False, method: str = "huber", law: Optional[str] = None) -> ScalingReport:
    """Every fit `minicpm scaling fit` reports: L(N, D) with bootstrap intervals and held-out checks, the
    compute-optimal plan, isoFLOP profiles and the envelope (these two only where the table allows).
    method: huber (approach 3 on log loss) or lsq (least squares on the raw loss, the paper's curve_fit);
    law: the form of L(N, D) (laws/variants.py; default DEFAULT_LAW for huber, the paper's own for lsq)."""
    law = law or default_law(method)
    fit = fit_law(method, table.params, table.tokens, table.loss, delta=delta, source=table.source, variant=law)
    boot = bootstrap_chinchilla(table, fit, n_boot=n_boot, confidence=confidence, seed=seed, progress=progress)
    try:
        envelope, note = fit_envelope(table, delta), None
    except MiniCPMError as e:
        envelope, note = None, str(e)
    for value in list(budgets or []) + [v for pair in predictions for v in pair]:
        if not (math.isfinite(value) and value > 0):
            raise MiniCPMError(f"budgets and predictions must be positive numbers, got {value!r}")
    return ScalingReport(table, fit, boot, held_out_checks(table, delta, method, law), list(budgets or default_budgets(table)),
                         list(predictions), fit_isoflop(table, isoflop_tol), envelope, note)


# ------------------------------------------------------------------------------------------- JSON

def _finite(obj: Any, where: str = "result") -> Any:
    """The object with numpy scalars made plain; a NaN or infinity is an error, never printed."""
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (float, np.floating, int, np.integer)) and not isinstance(obj, bool):
        if not math.isfinite(float(obj)):
            raise MiniCPMError(f"the fit produced a non-finite value at {where}; the data do not support it")
        return float(obj) if isinstance(obj, (float, np.floating)) else int(obj)
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, allow_nan=False)


def _compute_optimal(r: ScalingReport) -> list[dict]:
    law, rows = r.fit.law, []
    for c in r.budgets:
        n, d = float(law.n_opt(c)), float(law.d_opt(c))
        ns = np.array([b.n_opt(c) for b in r.boot.laws])
        ds = c / 6.0 / ns
        ls = np.array([b.loss(nb, db) for b, nb, db in zip(r.boot.laws, ns, ds)])
        rows.append({"flops": c, "n_opt": n, "d_opt": d, "tokens_per_param": d / n, "loss": float(law.loss(n, d)),
                     "intervals": {"n_opt": r.boot.interval(ns), "d_opt": r.boot.interval(ds),
                                   "tokens_per_param": r.boot.interval(ds / ns), "loss": r.boot.interval(ls)}})
    return rows


def _predictions(r: ScalingReport) -> list[dict]:
    return [{"params": n, "tokens": d, "loss": float(r.fit.law.loss(n, d)),
             "interval": r.boot.interval([b.loss(n, d) for b in r.boot.laws])} for n, d in r.predictions]


def _residuals(r: ScalingReport) -> np.ndarray:
    return r.fit.law.loss(r.table.params, r.table.tokens) / r.table.loss - 1.0


def report_json(r: ScalingReport) -> dict:
    law, rel = r.fit.law, _residuals(r)
    t = r.table
    return {
        "law": LAW_TEXT,
        "params": law.as_dict(),
        "intervals": {k: list(v) for k, v in r.boot.intervals().items()},
        "confidence": r.boot.confidence,
        "paper_names": {PAPER_NAMES[p]: getattr(law, p) for p in ("E", "A", "B")},
        "fit": {"method": r.fit.method, "variant": r.fit.variant, "points": len(t), "runs": len(set(t.run)),
                **({"huber_delta": r.fit.delta} if r.fit.method == "huber" else {}), "objective": r.fit.objective,
                "starts": r.fit.starts, "rmse_log_loss": float(np.sqrt(np.mean(np.log1p(rel) ** 2))),
                "max_abs_rel_err": float(np.abs(rel).max())},
        "bootstrap": {"resamples": len(r.boot.laws) + r.boot.failed, "failed": r.boot.failed},
        "residuals": [{"run": t.run[i], "params": t.params[i], "tokens": t.tokens[i], "loss": t.loss[i],
                       "predicted": t.loss[i] * (1 + rel[i]), "rel_err": rel[i]} for i in range(len(t))],
        "held_out": [{"label": h.label, "fit_points": h.n_fit, "held_points": h.n_held,
                      "mean_abs_rel_err": h.mean_abs_rel_err, "max_abs_rel_err": h.max_abs_rel_err,
                      "skipped": h.skipped} for h in r.held_out],
        "compute_optimal": {"K": law.K, "K2": law.K ** 2, "eta": law.eta,
                            "n_opt_exponent": law.beta / (law.alpha + law.beta),
                            "d_opt_exponent": law.alpha / (law.alpha + law.beta),
                            "budgets": _compute_optimal(r)},
        "predictions": _predictions(r),
        "isoflop": {"profiles": [vars(p) for p in r.isoflop.profiles], "n_opt_exponent": r.isoflop.a,
                    "d_opt_exponent": r.isoflop.b, "skipped": r.isoflop.skipped},
        "envelope": (vars(r.envelope) if r.envelope else {"skipped": r.envelope_note}),
    }


# ------------------------------------------------------------------------------------------- text

def _g(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def _iv(lo_hi: Sequence[float], digits: int = 3) -> str:
    return f"[{_g(lo_hi[0], digits)}, {_g(lo_hi[1], digits)}]"


def format_report(r: ScalingReport) -> str:
    t, law, rel = r.table, r.fit.law, _residuals(r)
    pct = f"{r.boot.confidence:.0%}"
    how = (f"Chinchilla approach 3: Huber delta={_g(r.fit.delta)} on log loss, L-BFGS" if r.fit.method == "huber"
           else f"least squares on the raw loss as the paper's curve_fit, RMSE {_g(r.fit.objective, 3)}")
    form = f"; law {r.fit.variant}: {law_variant(r.fit.variant).description}"
    out = [f"{LAW_TEXT}   ({how} from {r.fit.starts} grid starts{form})",
           f"  {len(t)} runs: {len(np.unique(t.params))} sizes N = {_g(t.params.min(), 3)}..{_g(t.params.max(), 3)}, "
           f"tokens D = {_g(t.tokens.min(), 3)}..{_g(t.tokens.max(), 3)}",
           f"  {'param':<12}{'value':>12}   {pct} interval ({len(r.boot.laws)} bootstrap resamples of runs"
           + (f", {r.boot.failed} failed" if r.boot.failed else "") + ")"]
    intervals = r.boot.intervals()
    for p in PARAMS:
        name = f"{p} ({PAPER_NAMES[p]})" if PAPER_NAMES[p] != p else p
        out.append(f"  {name:<12}{_g(getattr(law, p)):>12}   {_iv(intervals[p])}")
    out.append(f"  fit: RMSE of log loss {_g(float(np.sqrt(np.mean(np.log1p(rel) ** 2))), 3)}, "
               f"max |error| {np.abs(rel).max():.2%}")
    if law_variant(r.fit.variant).shared_exponent:
        out.append("  note: with alpha = beta, N_opt and D_opt grow as C^0.5 by construction (the allocation below); "
                   "fit --law chinchilla to measure their exponents")
    for h in r.held_out:
        if h.skipped:
            out.append(f"  held out {h.label}: skipped ({h.skipped})")
        else:
            out.append(f"  held out {h.label}, {h.n_held} runs: mean |error| {h.mean_abs_rel_err:.2%}, "
                       f"max {h.max_abs_rel_err:.2%}")
    a_n, a_d = law.beta / (law.alpha + law.beta), law.alpha / (law.alpha + law.beta)
    out += ["", f"Compute-optimal allocation (C = 6ND): N_opt = K*(C/6)^{a_n:.3f}, D_opt = (C/6)^{a_d:.3f}/K, "
                f"K = {_g(law.K)}, K^2 = {_g(law.K ** 2)}, eta = {law.eta:.3f}",
            f"  {'FLOPs':<10}{'N_opt (params)':<28}{'D_opt (tokens)':<28}{'tokens/param':<24}loss"]
    for row in _compute_optimal(r):
        iv = row["intervals"]
        out.append(f"  {_g(row['flops'], 3):<10}{_g(row['n_opt'], 3) + ' ' + _iv(iv['n_opt'], 2):<28}"
                   f"{_g(row['d_opt'], 3) + ' ' + _iv(iv['d_opt'], 2):<28}"
                   f"{_g(row['tokens_per_param'], 3) + ' ' + _iv(iv['tokens_per_param'], 2):<24}"
                   f"{row['loss']:.4f} {_iv(iv['loss'], 4)}")
    if r.predictions:
        out += ["", f"Predictions ({pct} interval)"]
        for p in _predictions(r):
            out.append(f"  N={_g(p['params'], 3)}  D={_g(p['tokens'], 3)}: "
                       f"loss {p['loss']:.4f} {_iv(p['interval'], 4)}")
    out += [""]
    iso = r.isoflop
    if iso.profiles:
        exps = (f": N_opt ~ C^{iso.a:.3f}, D_opt ~ C^{iso.b:.3f}" if iso.a is not None else
                " (one budget: no exponent)")
        out.append(f"isoFLOP profiles (approach 2){exps}")
        for p in iso.profiles:
            out.append(f"  C={_g(p.flops, 3)}: N_opt {_g(p.n_opt, 3)}, D_opt {_g(p.d_opt, 3)}, "
                       f"loss {p.loss:.4f} ({p.sizes} sizes)")
    else:
        out.append("isoFLOP profiles (approach 2): none (no compute budget has runs of 3 or more sizes)")
    out += [f"  skipped {s}" for s in iso.skipped]
    if r.envelope:
        e = r.envelope
        out.append(f"Envelope L(C) = b*C^-a + L0 over {e.points} runs on the front: a = {_g(e.a)}, b = {_g(e.b)}, "
                   f"L0 = {_g(e.L0)}")
    else:
        out.append(f"Envelope L(C) = b*C^-a + L0: skipped ({r.envelope_note})")
    return "\n".join(out)


def format_side_by_side(reports: Sequence[tuple[str, ScalingReport]]) -> str:
    """Several fits of one campaign in columns: the law's constants (paper names), the allocation and the checks.
    Losses per token and per byte differ in scale, so compare exponents, allocations and relative errors."""
    width = max(24, *(len(label) + 2 for label, _ in reports))
    rows = [("method", lambda r: r.fit.method), ("law", lambda r: r.fit.variant)]
    intervals = [r.boot.intervals() for _, r in reports]
    out = [f"  {'':<22}" + "".join(f"{label:>{width}}" for label, _ in reports)]
    for name, get in rows:
        out.append(f"  {name:<22}" + "".join(f"{get(r):>{width}}" for _, r in reports))
    for p in PARAMS:
        label = f"{p} ({PAPER_NAMES[p]})" if PAPER_NAMES[p] != p else p
        out.append(f"  {label:<22}" + "".join(f"{_g(getattr(r.fit.law, p)) + ' ' + _iv(iv[p]):>{width}}"
                                               for (_, r), iv in zip(reports, intervals)))
    derived = [("N_opt exponent", lambda law: law.beta / (law.alpha + law.beta)),
               ("eta = N_opt/D_opt exp.", lambda law: law.eta), ("K^2", lambda law: law.K ** 2)]
    for name, get in derived:
        out.append(f"  {name:<22}" + "".join(f"{_g(get(r.fit.law)):>{width}}" for _, r in reports))
    out.append(f"  {'max |error| in fit':<22}" + "".join(f"{np.abs(_residuals(r)).max():>{width}.2%}"
                                                          for _, r in reports))
    for i, h in enumerate(reports[0][1].held_out):
        cells = [r.held_out[i] for _, r in reports]
        out.append(f"  {'held out ' + ('largest' if i == 0 else 'longest'):<22}" +
                   "".join(f"{'skipped' if c.skipped else f'{c.mean_abs_rel_err:.2%}':>{width}}" for c in cells))
    return "\n".join(out)


def format_batch_fit(f: BatchSizeFit, at_loss: Sequence[float] = ()) -> str:
    iv = f.intervals()
    out = [f"bs_tokens = a / L^b   (least squares in log space, {f.n_points} pairs; "
           f"{f.boot.confidence:.0%} intervals from {len(f.boot.laws)} bootstrap resamples)",
           f"  a  {_g(f.law.a):>12}   {_iv(iv['a'])}", f"  b  {_g(f.law.b):>12}   {_iv(iv['b'])}",
           f"  fit: RMSE of log bs {_g(f.rmse_log, 3)}"]
    for loss in at_loss:
        out.append(f"  L = {_g(loss)}: batch {_g(float(f.law.batch_tokens(loss)), 3)} tokens "
                   f"{_iv(f.boot.interval([b.batch_tokens(loss) for b in f.boot.laws]))}")
    return "\n".join(out)


def batch_fit_json(f: BatchSizeFit, at_loss: Sequence[float] = ()) -> dict:
    return {"law": "bs_tokens = a / L^b", "params": {"a": f.law.a, "b": f.law.b},
            "intervals": {k: list(v) for k, v in f.intervals().items()}, "confidence": f.boot.confidence,
            "points": f.n_points, "rmse_log_bs": f.rmse_log,
            "predictions": [{"loss": l, "batch_tokens": float(f.law.batch_tokens(l)),
                             "interval": f.boot.interval([b.batch_tokens(l) for b in f.boot.laws])}
                            for l in at_loss]}


def format_curve_fit(f: CurveFit) -> str:
    how = "" if f.method == "optimum" else f"   (fitted by {f.method}: Luo et al.'s early-stopped AdamW)"
    out = [f"{f.law}: {FORMULAS[f.law]}{how}", f"  {'param':<8}value"]
    out += [f"  {k:<8}{_g(v, 6)}" for k, v in f.params.items()]
    for c in f.curves:
        out.append(f"  curve {c.name}: {c.points} points, RMSE {c.rmse_rel:.3%}, max |error| {c.max_abs_rel_err:.3%}")
    if f.at_bound:
        out.append(f"  note: {', '.join(f.at_bound)} ended on the search bound: these curves do not determine "
                   f"{'it' if len(f.at_bound) == 1 else 'them'}; check predictions against a held-out curve")
    return "\n".join(out)


def prediction_csv(steps: np.ndarray, lr: np.ndarray, loss: np.ndarray) -> str:
    _finite(loss.tolist(), "predicted_loss")
    buf = io.StringIO()
    buf.write("step,lr,predicted_loss\n")
    for s, l, y in zip(steps, lr[steps], loss):
        buf.write(f"{int(s)},{l:.6g},{y:.6f}\n")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- files

def plot_scaling(r: ScalingReport, out_dir: str | Path) -> list[Path]:
    """loss_vs_tokens.png (runs and fitted L(N, ·) per size) and compute_optimal.png (N_opt, D_opt with their
    bootstrap band, and the loss-vs-compute envelope)."""
    from matplotlib import colormaps

    out_dir = Path(out_dir)
    t, law = r.table, r.fit.law
    fig = figure(7, 5, dpi=120)
    ax = fig.subplots()
    sizes = np.unique(t.params)
    colors = colormaps["viridis"](np.linspace(0, 0.9, len(sizes)))
    for n, color in zip(sizes, colors):
        rows = t.params == n
        ax.scatter(t.tokens[rows], t.loss[rows], color=color, s=18, label=f"N={_g(n, 3)}")
        d = np.geomspace(t.tokens[rows].min() / 2, t.tokens[rows].max() * 2, 100)
        ax.plot(d, law.loss(n, d), color=color, lw=1)
    ax.set(xscale="log", xlabel="tokens D", ylabel="loss", title=f"{LAW_TEXT} (lines: fit)")
    ax.legend(fontsize=8)
    paths = [save_png(fig, out_dir / "loss_vs_tokens.png")]

    c_all = t.compute()
    c = np.geomspace(c_all.min(), max(c_all.max(), max(r.budgets)), 100)
    fig = figure(15, 4.5, dpi=120)
    axes = fig.subplots(1, 3)
    for ax, name, f in ((axes[0], "N_opt (params)", "n_opt"), (axes[1], "D_opt (tokens)", "d_opt")):
        band = np.array([getattr(b, f)(c) for b in r.boot.laws])
        tail = 50.0 * (1 - r.boot.confidence)
        lo, hi = np.percentile(band, [tail, 100 - tail], axis=0)
        ax.fill_between(c, lo, hi, alpha=0.25, label=f"{r.boot.confidence:.0%} interval")
        ax.plot(c, getattr(law, f)(c), label="approach 3 fit")
        iso = r.isoflop.profiles
        if iso:
            ax.scatter([p.flops for p in iso], [getattr(p, f) for p in iso], color="k", s=20, label="isoFLOP minima")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name)
        ax.legend(fontsize=8)
    axes[2].scatter(c_all, t.loss, s=12, color="gray", label="runs")
    if r.envelope:
        axes[2].plot(c, r.envelope.loss(c), label="envelope b*C^-a + L0")
    axes[2].plot(c, law.loss(law.n_opt(c), law.d_opt(c)), "--", label="L at (N_opt, D_opt)")
    axes[2].set(xscale="log", xlabel="compute C (FLOPs)", ylabel="loss")
    axes[2].legend(fontsize=8)
    fig.suptitle("compute-optimal frontier")
    paths.append(save_png(fig, out_dir / "compute_optimal.png"))
    return paths


def plot_curves(series: Sequence[tuple[str, np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]],
                path: str | Path, title: str) -> Path:
    """Loss against step for each (name, steps, predicted, observed or None, lr at those steps); LR on a twin axis."""
    fig = figure(8, 5, dpi=120)
    ax = fig.subplots()
    lr_ax = ax.twinx()
    for i, (name, steps, pred, obs, lr) in enumerate(series):
        color = f"C{i}"
        if obs is not None:
            ax.scatter(steps, obs, s=6, color=color, alpha=0.5)
        ax.plot(steps, pred, color=color, label=name)
        lr_ax.plot(steps, lr, color=color, ls=":", lw=1)
    ylabel = "loss (lines: law; dots: data)" if any(obs is not None for *_, obs, _ in series) else "loss"
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    lr_ax.set_ylabel("lr (dotted)")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_curve_fit(fit: CurveFit, curves: Sequence[Curve], out_dir: str | Path) -> Path:
    """curve_fit.png: each curve's loss after warmup (dots) and the fitted law (lines), the LR dotted."""
    series = []
    for c in curves:
        lr = lr_per_step(c.lr_steps, c.lr, int(max(c.lr_steps[-1], c.loss_steps[-1])))
        keep = c.loss_steps > warmup_end(lr)
        steps = c.loss_steps[keep].astype(int)
        series.append((c.name, steps, predict_loss(fit.law, fit.params, lr, steps), c.loss[keep], lr[steps]))
    return plot_curves(series, Path(out_dir) / "curve_fit.png", f"{fit.law} law fit")


def plot_prediction(name: str, law: str, params: dict[str, float], lr: np.ndarray, out_dir: str | Path) -> Path:
    """predicted_curve.png: the predicted loss after warmup (about 1000 steps) and the schedule."""
    steps = prediction_steps(len(lr) - 1)
    steps = steps[steps > warmup_end(lr)]
    return plot_curves([(name, steps, predict_loss(law, params, lr, steps), None, lr[steps])],
                       Path(out_dir) / "predicted_curve.png", f"{law} law prediction")
