"""A run's prediction, carried while it trains (run.prediction): a loss curve against tokens with a band around it,
read from a plan (PLAN.yaml of `minicpm plan`, or the PLAN.prediction.json beside it). At every evaluation the loop
logs the predicted loss and band at the run's tokens (eval/prediction/{loss,lo,hi,rel} in metrics.jsonl), shows
them on the evaluation line and the progress bar, and warns once each time the evaluated loss leaves the band.

`minicpm report RUN --prediction FILE` (scaling/prediction.py) compares after the fact, from the same files and from
curve-law and scaling-law fits, which need the laws to be run on the run's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object

PREFIX = "eval/prediction/"


@dataclass
class Prediction:
    source: str
    tokens: np.ndarray
    loss: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    label: str
    loss_key: str = "eval_loss"
    """Which evaluated loss the prediction is of."""

    def at(self, tokens: float) -> Optional[tuple[float, float, float]]:
        """(predicted, lo, hi) at `tokens`, linear between the predicted points; None outside them."""
        if not self.tokens[0] * (1 - 1e-9) <= tokens <= self.tokens[-1] * (1 + 1e-9):
            return None
        return tuple(float(np.interp(tokens, self.tokens, a)) for a in (self.loss, self.lo, self.hi))


def plan_prediction_path(plan_yaml: str | Path) -> Path:
    """PLAN.prediction.json, beside PLAN.yaml: where `minicpm plan` writes what it predicts."""
    plan_yaml = Path(plan_yaml)
    return plan_yaml.with_name(plan_yaml.stem + ".prediction.json")


def band_arrays(curve: dict, source: str) -> tuple[np.ndarray, ...]:
    try:
        out = tuple(np.asarray(curve[k], dtype=float) for k in ("tokens", "loss", "lo", "hi"))
    except (KeyError, TypeError, ValueError):
        raise MiniCPMError(f"{source}: curve needs lists tokens, loss, lo, hi of numbers") from None
    if len({len(a) for a in out}) != 1 or len(out[0]) < 1 or not all(np.all(np.isfinite(a)) for a in out):
        raise MiniCPMError(f"{source}: curve lists tokens, loss, lo, hi must be finite and of one length")
    if np.any(np.diff(out[0]) <= 0):
        raise MiniCPMError(f"{source}: curve tokens must increase")
    return out


def prediction_from_plan(doc: dict, source: str) -> Prediction:
    """The planned curve and band (or, without a curve, the planned final loss and its interval)."""
    key = doc.get("loss_key", "eval_loss")
    if doc.get("curve"):
        return Prediction(source, *band_arrays(doc["curve"], source), "planned curve", key)
    final = doc.get("final") or {}
    try:
        tokens, loss, (lo, hi) = float(final["tokens"]), float(final["loss"]), map(float, final["interval"])
    except (KeyError, TypeError, ValueError):
        raise MiniCPMError(f"{source}: needs 'curve' or 'final' with tokens, loss, interval") from None
    return Prediction(source, *(np.array([v]) for v in (tokens, loss, lo, hi)), "planned final loss", key)


def load_plan_prediction(path: str | Path) -> Prediction:
    """What run.prediction names: a plan's PLAN.yaml (its PLAN.prediction.json is read) or the JSON itself."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        sidecar = plan_prediction_path(path)
        if not sidecar.is_file():
            raise MiniCPMError(f"run.prediction {path}: no {sidecar.name} beside it (the plan's prediction, written "
                               f"by minicpm plan)")
        path = sidecar
    if not path.is_file():
        raise MiniCPMError(f"run.prediction {path}: no such file (a plan's .prediction.json; run.prediction=null "
                           f"trains without it)")
    doc = read_json_object(path)
    if doc.get("kind") != "plan":
        raise MiniCPMError(f"run.prediction {path}: not a plan's prediction (kind: plan); a curve-law or scaling "
                           f"fit is compared after the fact: minicpm report RUN --prediction {path}")
    return prediction_from_plan(doc, str(path))


class LivePrediction:
    """The prediction at each evaluation: the values to log, the text to show, and a warning on leaving the band."""

    def __init__(self, prediction: Prediction):
        self.prediction = prediction
        self.outside = False

    def evaluate(self, tokens: float, evaluation: dict) -> tuple[dict[str, float], str, Optional[str]]:
        """(eval/prediction/* values, a text for the evaluation line, a warning or None) at an evaluation."""
        at = self.prediction.at(tokens)
        actual = evaluation.get(self.prediction.loss_key)
        if at is None or not isinstance(actual, (int, float)):
            return {}, "", None
        predicted, lo, hi = at
        rel = actual / predicted - 1.0
        values = {PREFIX + "loss": predicted, PREFIX + "lo": lo, PREFIX + "hi": hi, PREFIX + "rel": rel}
        text = f"predicted {predicted:.4f} [{lo:.4f}, {hi:.4f}] ({rel:+.2%})"
        outside = not lo <= actual <= hi
        warning = None
        if outside and not self.outside:
            side, edge = ("above", hi) if actual > hi else ("below", lo)
            warning = (f"{self.prediction.loss_key} {actual:.4f} left the predicted band: {actual - edge:+.4f} "
                       f"({actual / edge - 1:+.2%}) {side} [{lo:.4f}, {hi:.4f}] at {tokens:.4g} tokens "
                       f"({self.prediction.label}, {self.prediction.source})")
        self.outside = outside
        return values, text, warning
