"""Watching a run against its prediction (`minicpm report RUN --prediction PLAN_OR_FIT`).

A prediction is a loss curve against tokens with a band around it, read from
- a plan (PLAN.yaml of `minicpm plan`, or the PLAN.prediction.json beside it): the curve and band it predicted;
- a curve-law fit (the JSON of `scaling fit-curve`): the law run on the run's own schedule (its config.yaml),
  the band ±2× the fit's worst relative RMSE;
- a scaling-law fit (the JSON of `scaling fit`): L(N, D) at the run's N for every D it reaches (the loss a decay at
  D would end at), the band ±2× the fit's RMSE of log loss.
The comparison is at the run's last evaluation (eval_loss): its distance from the predicted curve, and whether it
lies inside the band. A run trained with run.prediction (a plan) carries the same comparison at every evaluation
(train/prediction.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object
from minicpm.train.prediction import Prediction, plan_prediction_path, prediction_from_plan


def _run_schedule(run) -> tuple[np.ndarray, int]:
    """The LR at every step of the run's schedule, and its tokens per step, from its config.yaml."""
    from minicpm.laws.tables import schedule_lr_from_config

    config = run.read_config_dict()
    tokens_per_step = (config.get("batch") or {}).get("tokens_per_step")
    if not isinstance(tokens_per_step, int) or tokens_per_step <= 0:
        raise MiniCPMError(f"{run.config_file}: no batch.tokens_per_step to place the prediction on tokens")
    return schedule_lr_from_config(config, str(run.config_file)), tokens_per_step


def _from_curve_fit(doc: dict, source: str, run) -> Prediction:
    from minicpm.laws.curves import load_fit_params, predict_loss, prediction_steps

    law, params = load_fit_params(doc, source)
    lr, tokens_per_step = _run_schedule(run)
    steps = prediction_steps(len(lr) - 1)
    loss = predict_loss(law, params, lr, steps)
    rmse = max([c.get("rmse_rel", 0.0) for c in doc.get("curves") or [] if isinstance(c, dict)] or [0.0])
    return Prediction(source, steps * float(tokens_per_step), loss, loss * (1 - 2 * rmse), loss * (1 + 2 * rmse),
                      f"{law} law on the run's schedule")


def _from_scaling_fit(doc: dict, source: str, run) -> Prediction:
    from minicpm.laws.chinchilla import ScalingLaw
    from minicpm.laws.tables import run_model_config

    try:
        law = ScalingLaw(**{k: float(doc["params"][k]) for k in ("E", "A", "B", "alpha", "beta")})
    except (KeyError, TypeError, ValueError):
        raise MiniCPMError(f"{source}: params needs E, A, B, alpha, beta (the JSON of `scaling fit`)") from None
    lr, tokens_per_step = _run_schedule(run)
    n = run_model_config(run.path).non_embedding_params()
    tokens = np.linspace(1, len(lr) - 1, 200) * tokens_per_step
    loss = law.loss(n, tokens)
    spread = math.expm1(2 * float((doc.get("fit") or {}).get("rmse_log_loss", 0.0)))
    return Prediction(source, tokens, loss, loss * (1 - spread), loss * (1 + spread), f"L(N={n:.3g}, D)")


def load_prediction(path: str | Path, run_dir: str | Path) -> Prediction:
    """The prediction in `path` (a plan YAML, its .prediction.json, or a fit JSON) for the run in run_dir."""
    from minicpm.rundir import RunDir

    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        sidecar = plan_prediction_path(path)
        if not sidecar.is_file():
            raise MiniCPMError(f"{path}: no {sidecar.name} beside it (the plan's prediction, written by minicpm plan)")
        path = sidecar
    doc = read_json_object(path)
    source = str(path)
    if doc.get("kind") == "plan":
        return prediction_from_plan(doc, source)
    if doc.get("law") in ("tissue", "mpl"):
        return _from_curve_fit(doc, source, RunDir(run_dir))
    if isinstance(doc.get("params"), dict) and "E" in doc["params"]:
        return _from_scaling_fit(doc, source, RunDir(run_dir))
    raise MiniCPMError(f"{source}: not a prediction (a plan's .prediction.json, or the JSON of scaling fit-curve or "
                       f"scaling fit)")


@dataclass
class Comparison:
    step: int
    tokens: float
    actual: float
    predicted: float
    lo: float
    hi: float

    @property
    def rel(self) -> float:
        return self.actual / self.predicted - 1.0

    @property
    def inside(self) -> bool:
        return self.lo <= self.actual <= self.hi

    def text(self, run: str) -> str:
        where = "inside" if self.inside else ("below" if self.actual < self.lo else "above")
        return (f"{run}: last eval at step {self.step} ({self.tokens:.4g} tokens): eval_loss {self.actual:.4f}, "
                f"predicted {self.predicted:.4f} [{self.lo:.4f}, {self.hi:.4f}]: {self.rel:+.2%}, {where} the band")


def compare(prediction: Prediction, evals: list[dict]) -> Optional[Comparison]:
    """The run's last evaluation against the prediction at its tokens (None without evaluations, or when it lies
    before the first predicted point or after the last)."""
    points = [r for r in evals if isinstance(r.get("eval_loss"), (int, float)) and isinstance(r.get("tokens"),
                                                                                              (int, float))]
    if not points:
        return None
    last = points[-1]
    t = float(last["tokens"])
    span = prediction.tokens
    if not (span[0] * (1 - 1e-9) <= t <= span[-1] * (1 + 1e-9)):
        return None
    at = [float(np.interp(t, span, a)) for a in (prediction.loss, prediction.lo, prediction.hi)]
    return Comparison(int(last.get("step", 0)), t, float(last["eval_loss"]), *at)


def prediction_plot(run, prediction: Prediction, comparison: Optional[Comparison]) -> bytes:
    """The predicted curve and its band over the run's train loss and evaluations, against tokens."""
    from minicpm.plots import figure, png_bytes

    fig = figure()
    ax = fig.add_subplot()
    if len(prediction.tokens) > 1:
        ax.fill_between(prediction.tokens, prediction.lo, prediction.hi, color="C1", alpha=0.25, label="predicted band")
        ax.plot(prediction.tokens, prediction.loss, color="C1", lw=1.5, label=prediction.label)
    else:
        ax.errorbar(prediction.tokens, prediction.loss, yerr=[prediction.loss - prediction.lo,
                                                              prediction.hi - prediction.loss],
                    color="C1", marker="s", capsize=4, label=prediction.label)
    if run.train:
        ax.plot([r["tokens"] for r in run.train], [r["loss"] for r in run.train], color="C0", lw=0.8, alpha=0.6,
                label=f"{run.name} train")
    if run.evals:
        ax.plot([r["tokens"] for r in run.evals], [r["eval_loss"] for r in run.evals], color="C0", ls="--",
                marker="o", ms=4, lw=0.9, label=f"{run.name} held-out")
    if comparison is not None:
        ax.set_title(f"against the prediction: last eval {comparison.rel:+.2%} "
                     f"({'inside' if comparison.inside else 'outside'} the band)")
    else:
        ax.set_title("against the prediction")
    values = np.concatenate([prediction.lo, prediction.hi] + ([np.array([r["eval_loss"] for r in run.evals])]
                                                              if run.evals else []))
    tail = values[len(values) // 10:] if len(values) > 10 else values
    ax.set_ylim(values.min() - 0.05 * abs(values.min()), max(np.percentile(tail, 95), values.min() + 0.1))
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def against_prediction(run, prediction_file: str | Path) -> tuple[str, bytes]:
    """For a loaded run (report.RunData): the line saying how far its last eval is from the prediction, and the plot."""
    prediction = load_prediction(prediction_file, run.path)
    comparison = compare(prediction, run.evals)
    if comparison is not None:
        line = comparison.text(run.name)
    elif not run.evals:
        line = f"{run.name}: no evaluation yet to compare with {prediction.label} ({prediction.source})"
    else:
        line = (f"{run.name}: last eval at {run.evals[-1].get('tokens', 0):.4g} tokens lies outside the predicted "
                f"range {prediction.tokens[0]:.4g}..{prediction.tokens[-1]:.4g} tokens")
    return line, prediction_plot(run, prediction, comparison)
