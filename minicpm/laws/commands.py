"""What `minicpm scaling fit | fit-curve | predict-curve` do, end to end: read the inputs, fit, and write the JSON,
the text and the plots. Each returns what it printed's parts, so the CLI only prints them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.laws import BOOTSTRAP_RESAMPLES, CONFIDENCE

FORMS = ("loss", "batch")
"""loss: L(N, D) = E + A/N^alpha + B/D^beta; batch: the optimal batch-size law bs = a/L^b."""
CURVE_LAWS = ("tissue", "mpl")
"""The LR-annealing law (Tissue et al. 2024) and the multi-power law (Luo et al. 2025)."""


@dataclass
class FitOutput:
    text: str
    """The human-readable report."""
    json: str
    """The same as one JSON document."""
    written: list[Path] = field(default_factory=list)
    """Files written besides (plots)."""


def fit_scaling(inputs: Sequence[str], *, form: str = "loss", loss_key: str = "eval_loss", delta: float = 1e-3,
                bootstrap: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0, budgets: Sequence[float] | None = None,
                predictions: Sequence[tuple[float, float]] = (), at_loss: Sequence[float] = (),
                isoflop_tol: float = 0.05, out: str | None = None, plot: str | None = None,
                progress: bool = False, method: str = "huber", law: str | None = None, holdout: str | None = None,
                leave_one_size_out: bool = False) -> FitOutput:
    """Fit L(N, D) (or the batch-size law) to tables or run directories; JSON to `out`, plots into `plot`.
    law: the form of L(N, D) (laws/variants.py); holdout="largest" adds the law fitted without the largest size
    predicting it; leave_one_size_out adds every size predicted by every law fitted on the others."""
    from minicpm.laws import chinchilla as fit
    from minicpm.laws import tables as fit_data
    from minicpm.laws import report as fit_report
    if form not in FORMS:
        raise MiniCPMError(f"--form {form!r}: expected one of {', '.join(FORMS)}")
    report = None
    if form == "batch":
        table = fit_data.load_runs(inputs, required=("loss", "batch_tokens"), loss_key=loss_key)
        result = fit.fit_batch_size_law(table.loss, table.batch_tokens, table.run, n_boot=bootstrap,
                                        confidence=confidence, seed=seed)
        doc, text = fit_report.batch_fit_json(result, at_loss), fit_report.format_batch_fit(result, at_loss)
    else:
        table = fit_data.load_runs(inputs, loss_key=loss_key)
        report = fit_report.analyse_table(table, delta=delta, n_boot=bootstrap, confidence=confidence, seed=seed,
                                          budgets=budgets, predictions=predictions, isoflop_tol=isoflop_tol,
                                          progress=progress, method=method, law=law)
        doc, text = fit_report.report_json(report), fit_report.format_report(report)
        doc, text = _held_out_sizes(table, doc, text, method=method, law=report.fit.variant, holdout=holdout,
                                    every_size=leave_one_size_out, delta=delta, confidence=confidence, seed=seed)
    output = FitOutput(text, fit_report.dumps(doc))
    if out:
        write_atomic(out, output.json + "\n")
    if plot and report is not None:
        output.written = list(fit_report.plot_scaling(report, plot))
    return output


def _held_out_sizes(table, doc: dict, text: str, *, method: str, law: str, holdout: str | None, every_size: bool,
                    delta: float, confidence: float, seed: int) -> tuple[dict, str]:
    """The report with `--holdout largest` and `--leave-one-size-out` added (JSON keys holdout, leave_one_size_out)."""
    from minicpm.laws import extrapolation
    from minicpm.laws.variants import VARIANTS

    if holdout not in (None, "largest"):
        raise MiniCPMError(f"--holdout {holdout!r}: the only holdout is 'largest'")
    options = dict(method=method, delta=delta, confidence=confidence, seed=seed)
    if holdout:
        row = extrapolation.holdout_largest(table, law, **options)
        doc["holdout"] = row.to_json()
        text += "\n\nHeld out: the largest size, predicted by the law fitted on the others\n" + \
            extrapolation.format_held_out([row], confidence)
    if every_size:
        laws = ["chinchilla"] if method == "lsq" else list(VARIANTS)
        rows = extrapolation.leave_one_size_out(table, laws, **options)
        doc["leave_one_size_out"] = [r.to_json() for r in rows]
        text += "\n\nLeave one size out: each size predicted by each law fitted on the other sizes\n" + \
            extrapolation.format_held_out(rows, confidence)
    return doc, text


def fit_curve(curves: Sequence[str], *, law: str, loss_key: str = "loss", delta: float = 1e-3, min_step: int = 0,
              max_points: int = 200, out: str | None = None, plot: str | None = None,
              method: str | None = None) -> FitOutput:
    """Fit a loss-curve law to training curves (metrics.jsonl, run directories or CSVs of step, lr, loss);
    method: optimum (the objective's deepest optimum) or luo (mpl by Luo et al.'s early-stopped AdamW); None: luo
    for mpl, optimum for the others (laws.curves.default_fit_method)."""
    from minicpm.laws import curves as curve_laws
    from minicpm.laws import tables as fit_data
    from minicpm.laws import report as fit_report
    if law not in CURVE_LAWS:
        raise MiniCPMError(f"--law {law!r}: expected one of {', '.join(CURVE_LAWS)}")
    loaded = [fit_data.load_curve(c, loss_key) for c in curves]
    result = curve_laws.fit_curve_law(law, loaded, delta=delta, min_step=min_step, max_points=max(max_points, 1),
                                      method=method)
    output = FitOutput(fit_report.format_curve_fit(result), fit_report.dumps(result.to_json()))
    if out:
        write_atomic(out, output.json + "\n")
    if plot:
        output.written = [fit_report.plot_curve_fit(result, loaded, plot)]
    return output


def predict_curve(fit_file: str, schedule: str, *, every: int | None = None,
                  plot: str | None = None) -> tuple[str, list[Path]]:
    """CSV step,lr,predicted_loss of a schedule under a fitted curve law, and the plot written, if asked."""
    from minicpm.laws import curves as curve_laws
    from minicpm.laws import tables as fit_data
    from minicpm.laws import report as fit_report
    law, params = curve_laws.load_fit_file(fit_file)
    lr = fit_data.load_schedule(schedule)
    if every is not None and every < 1:
        raise MiniCPMError(f"--every must be >= 1, got {every}")
    steps = curve_laws.prediction_steps(len(lr) - 1, every)
    loss = curve_laws.predict_loss(law, params, lr, steps)
    written = [fit_report.plot_prediction(Path(schedule).stem, law, params, lr, plot)] if plot else []
    return fit_report.prediction_csv(steps, lr, loss), written
