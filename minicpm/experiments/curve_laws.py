"""Loss-curve laws: the loss at every step of a run as a function of its LR schedule.

- LR-annealing law (Tissue et al. 2024): L(s) = L0 + A·S1^-alpha − C·S2, S1 = Σ lr_i (i = 1..s),
  S2 = Σ m_i, m_i = lambda·m_{i−1} + (lr_{i−1} − lr_i).
- Multi-power law (Luo et al. 2025):
  L(t) = L0 + A·(S1(t) + S_W)^-alpha − B·Σ_k (lr_{k−1} − lr_k)·G(lr_k^-gamma·S_k(t)),
  G(x) = 1 − (C·x + 1)^-beta, S_k(t) = Σ_{tau=k..t} lr_tau, S_W the warmup's area.

The schedule is the LR at every step 0..T (lr[0] is the LR before the first update). Warmup ends at the first step
where the LR reaches its peak; as in both papers the annealing terms start there (the LR rising during warmup is
not annealing), so S1 + S_W is simply the whole area up to t and m_i = 0 through warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import least_squares, nnls
from scipy.signal import lfilter

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object
from minicpm.experiments.fit import single_threaded_blas
from minicpm.experiments.fit_data import Curve, lr_per_step

LAWS: dict[str, tuple[str, ...]] = {
    "tissue": ("L0", "A", "alpha", "C", "lambda"),
    "mpl": ("L0", "A", "alpha", "B", "C", "beta", "gamma"),
}
FORMULAS = {
    "tissue": "L(s) = L0 + A*S1^-alpha - C*S2;  S2 = sum m_i, m_i = lambda*m_(i-1) + (lr_(i-1) - lr_i)",
    "mpl": "L(t) = L0 + A*(S1+S_W)^-alpha - B*sum_k (lr_(k-1) - lr_k)*(1 - (C*lr_k^-gamma*S_k(t) + 1)^-beta)",
}
MAX_BLOCKS = 2000
"""The multi-power sum is exact up to this many LR changes; longer decays merge neighbouring steps into blocks."""


def warmup_end(lr: np.ndarray) -> int:
    """The first step at which the LR reaches its peak."""
    return int(np.argmax(lr))


# ------------------------------------------------------------------------------------------- per-schedule terms

class _TissueTerms:
    """What the LR-annealing law needs from one schedule, at the steps to predict."""

    def __init__(self, lr: np.ndarray, steps: np.ndarray):
        w = warmup_end(lr)
        self.s1 = (np.cumsum(lr) - lr[0])[steps]
        self.delta = np.zeros_like(lr)
        self.delta[w + 1:] = lr[w:-1] - lr[w + 1:]
        self.steps = steps

    def annealing_area(self, lam: float) -> np.ndarray:
        """S2 at the steps, and the momenta m_i at every step."""
        m = lfilter([1.0], [1.0, -lam], self.delta)  # m_i = lambda·m_{i-1} + (lr_{i-1} − lr_i)
        return np.cumsum(m)[self.steps], m

    def predict(self, theta: np.ndarray, jac: bool = False):
        l0, a, alpha, c = np.exp(theta[:4])
        lam = 1.0 - math.exp(theta[4])  # fitted as log(1 − lambda)
        s2, m = self.annealing_area(lam)
        u = np.exp(-alpha * np.log(self.s1))
        pred = l0 + a * u - c * s2
        if not jac:
            return pred
        m_prev = np.concatenate([[0.0], m[:-1]])
        ds2 = np.cumsum(lfilter([1.0], [1.0, -lam], m_prev))[self.steps]  # d S2 / d lambda
        j = np.stack([np.full_like(u, l0), a * u, -a * u * np.log(self.s1) * alpha, -c * s2,
                      -c * ds2 * -(1.0 - lam)], axis=1)
        return pred, j


class _MPLTerms:
    """What the multi-power law needs from one schedule: the area up to each step and, per LR change k after
    warmup, its size lr_{k−1} − lr_k, log lr_k and S_k(t) (0 where k > t, and G(0) = 0)."""

    def __init__(self, lr: np.ndarray, steps: np.ndarray):
        w = warmup_end(lr)
        cs = np.cumsum(lr)
        self.area = (cs - lr[0])[steps]
        k = w + 1 + np.flatnonzero(lr[w:-1] != lr[w + 1:])
        dk = lr[k - 1] - lr[k]
        if len(k) > MAX_BLOCKS:  # merge neighbouring changes; each block acts at its change-weighted centre
            blocks = np.array_split(np.arange(len(k)), MAX_BLOCKS)
            weights = [np.abs(dk[b]) + 1e-300 for b in blocks]
            k = np.array([int(round(np.average(k[b], weights=wt))) for b, wt in zip(blocks, weights)])
            dk = np.array([dk[b].sum() for b in blocks])
        floor = lr.max() * 1e-12
        self.dk = dk
        self.log_lr = np.log(np.maximum(lr[k], floor))
        self.sk = np.maximum(cs[steps][:, None] - cs[k - 1][None, :], 0.0)

    def predict(self, theta: np.ndarray, jac: bool = False):
        l0, a, alpha, b, c, beta, gamma = np.exp(theta)
        u = np.exp(-alpha * np.log(self.area))
        cx = c * np.exp(-gamma * self.log_lr)[None, :] * self.sk
        lq = np.log1p(cx)
        g = -np.expm1(-beta * lq)
        pred = l0 + a * u - b * (g @ self.dk)
        if not jac:
            return pred
        p = np.exp(-beta * lq)
        r = cx / (1.0 + cx) * p
        j = np.stack([np.full_like(u, l0), a * u, -a * u * np.log(self.area) * alpha, -b * (g @ self.dk),
                      -b * beta * (r @ self.dk), -b * beta * ((p * lq) @ self.dk),
                      b * beta * gamma * (r @ (self.dk * self.log_lr))], axis=1)
        return pred, j

    def annealing_features(self, c: float, beta: float, gamma: float) -> np.ndarray:
        cx = c * np.exp(-gamma * self.log_lr)[None, :] * self.sk
        return -np.expm1(-beta * np.log1p(cx)) @ self.dk


def _terms(law: str, lr: np.ndarray, steps: np.ndarray):
    return _TissueTerms(lr, steps) if law == "tissue" else _MPLTerms(lr, steps)


def _check_law(law: str) -> tuple[str, ...]:
    if law not in LAWS:
        raise MiniCPMError(f"unknown loss-curve law {law!r}; choose {' or '.join(LAWS)}")
    return LAWS[law]


def _theta(law: str, params: dict[str, float]) -> np.ndarray:
    v = dict(params)
    if law == "tissue":
        v["lambda"] = 1.0 - v["lambda"]  # lambda is fitted as log(1 − lambda)
    return np.log([v[n] for n in LAWS[law]])


def _params(law: str, theta: np.ndarray) -> dict[str, float]:
    v = dict(zip(LAWS[law], np.exp(theta).tolist()))
    if law == "tissue":
        v["lambda"] = 1.0 - v["lambda"]
    return v


def predict_loss(law: str, params: dict[str, float], lr: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Predicted loss at `steps` (each >= 1) of the schedule `lr` (the LR at every step 0..T)."""
    names = _check_law(law)
    missing = [n for n in names if n not in params]
    if missing:
        raise MiniCPMError(f"law {law!r} needs parameter {missing[0]!r}; have {', '.join(params)}")
    steps = np.asarray(steps, dtype=int)
    if len(lr) < 2 or steps.min(initial=1) < 1 or steps.max(initial=1) >= len(lr):
        raise MiniCPMError(f"prediction steps must lie in 1..{len(lr) - 1}")
    out = np.empty(len(steps))
    rows = len(steps) if law == "tissue" else 1000  # the multi-power matrix is rows x (at most MAX_BLOCKS)
    for i in range(0, len(steps), rows):
        out[i:i + rows] = _terms(law, lr, steps[i:i + rows]).predict(_theta(law, params))
    return out


# ------------------------------------------------------------------------------------------- fitting

@dataclass
class CurveStats:
    name: str
    points: int
    rmse_rel: float
    max_abs_rel_err: float


@dataclass
class CurveFit:
    law: str
    params: dict[str, float]
    delta: float
    curves: list[CurveStats] = field(default_factory=list)
    at_bound: list[str] = field(default_factory=list)
    """Parameters that ended on their search bound: the curves do not determine them (predictions may still hold)."""

    def to_json(self) -> dict:
        return {"law": self.law, "formula": FORMULAS[self.law], "params": self.params, "huber_delta": self.delta,
                "at_bound": self.at_bound, "curves": [vars(c) for c in self.curves]}


@dataclass
class _Data:
    name: str
    terms: object
    loss: np.ndarray


def _prepare(law: str, curves: Sequence[Curve], min_step: int, max_points: int) -> list[_Data]:
    out = []
    for cv in curves:
        last = int(max(cv.lr_steps[-1], cv.loss_steps[-1]))
        lr = lr_per_step(cv.lr_steps, cv.lr, last)
        if lr.max() <= 0:
            raise MiniCPMError(f"{cv.name}: the LR is 0 everywhere")
        keep = (cv.loss_steps > warmup_end(lr)) & (cv.loss_steps >= max(min_step, 1))
        steps, loss = cv.loss_steps[keep].astype(int), cv.loss[keep]
        if len(steps) > max_points:  # evenly spaced in step: the laws' cost grows with the points
            pick = np.unique(np.linspace(0, len(steps) - 1, max_points).round().astype(int))
            steps, loss = steps[pick], loss[pick]
        if len(steps):
            out.append(_Data(cv.name, _terms(law, lr, steps), loss))
    return out


def _starts(law: str, data: list[_Data], n_starts: int) -> list[np.ndarray]:
    """Variable projection on a grid: for fixed exponents the laws are linear in (L0, A, C) or (L0, A, B), which
    non-negative least squares (relative residuals) solves; the best grid points start the full fit."""
    obs = np.concatenate([d.loss for d in data])
    scored = []
    if law == "tissue":
        for alpha in (0.2, 0.4, 0.6, 0.9):
            for one_minus_lam in (1e-1, 1e-2, 1e-3, 1e-4):
                f = np.concatenate([np.stack([np.ones(len(d.loss)), d.terms.s1 ** -alpha,
                                              -d.terms.annealing_area(1.0 - one_minus_lam)[0]], axis=1)
                                    for d in data])
                lin, res = nnls(f / obs[:, None], np.ones_like(obs))
                lin = np.maximum(lin, 1e-8 * obs.mean())
                scored.append((res, [math.log(lin[0]), math.log(lin[1]), math.log(alpha), math.log(lin[2]),
                                     math.log(one_minus_lam)]))
    else:
        for alpha in (0.3, 0.5, 0.8):
            for beta in (0.3, 0.6, 1.0):
                for gamma in (0.3, 0.6):
                    for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
                        f = np.concatenate([np.stack([np.ones(len(d.loss)), d.terms.area ** -alpha,
                                                      -d.terms.annealing_features(c, beta, gamma)], axis=1)
                                            for d in data])
                        lin, res = nnls(f / obs[:, None], np.ones_like(obs))
                        lin = np.maximum(lin, 1e-8 * obs.mean())
                        scored.append((res, [math.log(lin[0]), math.log(lin[1]), math.log(alpha), math.log(lin[2]),
                                             math.log(c), math.log(beta), math.log(gamma)]))
    scored.sort(key=lambda s: s[0])
    return [np.array(s[1]) for s in scored[:n_starts]]


def _bounds(law: str, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo_l0, hi_l0 = math.log(obs.min() * 1e-3), math.log(obs.max())
    if law == "tissue":  # L0, A, alpha, C, log(1 − lambda)
        return np.array([lo_l0, -40, math.log(1e-3), -40, math.log(1e-7)]), \
            np.array([hi_l0, 40, math.log(3.0), 40, math.log(0.5)])
    return np.array([lo_l0, -40, math.log(1e-3), -40, -40, math.log(1e-3), math.log(1e-3)]), \
        np.array([hi_l0, 40, math.log(3.0), 40, 40, math.log(10.0), math.log(3.0)])


@single_threaded_blas
def fit_curve_law(law: str, curves: Sequence[Curve], *, delta: float = 1e-3, min_step: int = 0,
                  max_points: int = 200, n_starts: int = 3) -> CurveFit:
    """Fit a loss-curve law to one or more curves: Huber (scale delta) on relative residuals, trust-region
    least squares with analytic Jacobians, from the best grid points of a variable-projection search.

    Points up to the end of warmup (and before min_step) are left out: both laws describe the curve after it.
    """
    names = _check_law(law)
    data = _prepare(law, curves, min_step, max_points)
    n = sum(len(d.loss) for d in data)
    if n <= len(names):
        raise MiniCPMError(f"{n} loss points after warmup; law {law!r} has {len(names)} parameters: "
                           f"give longer or more curves")
    if all(not np.any(d.terms.dk if law == "mpl" else d.terms.delta) for d in data):
        raise MiniCPMError(f"no curve's LR decreases after warmup, so the annealing part of law {law!r} cannot be "
                           f"fitted: add a curve with a decay (cosine or WSD)")
    obs = np.concatenate([d.loss for d in data])

    def residuals(theta):
        return np.concatenate([d.terms.predict(theta) / d.loss - 1.0 for d in data])

    def jacobian(theta):
        return np.concatenate([d.terms.predict(theta, jac=True)[1] / d.loss[:, None] for d in data])

    lo, hi = _bounds(law, obs)
    best = None
    for theta0 in _starts(law, data, n_starts):
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                res = least_squares(residuals, np.clip(theta0, lo + 1e-9, hi - 1e-9), jac=jacobian,
                                    bounds=(lo, hi), loss="huber", f_scale=delta, method="trf",
                                    x_scale="jac", max_nfev=500, xtol=1e-10, ftol=1e-10, gtol=1e-10)
        except ValueError:
            continue  # the start produced a non-finite residual
        if res.status <= 0 or not np.all(np.isfinite(res.fun)):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        raise MiniCPMError(f"the {law!r} loss-curve fit did not converge from any start")
    params = _params(law, best.x)
    if not all(math.isfinite(v) for v in params.values()):
        raise MiniCPMError(f"the {law!r} loss-curve fit gave non-finite parameters")
    stats = []
    for d in data:
        rel = d.terms.predict(best.x) / d.loss - 1.0
        stats.append(CurveStats(d.name, len(rel), float(np.sqrt(np.mean(rel ** 2))), float(np.abs(rel).max())))
    at_bound = [n for n, v, a, b in zip(names, best.x, lo, hi) if min(v - a, b - v) < 1e-6]
    return CurveFit(law, params, delta, stats, at_bound)


def load_fit_params(doc: object, source: str) -> tuple[str, dict[str, float]]:
    """(law, params) from the JSON that `fit-curve --json` prints."""
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
        raise MiniCPMError(f"{source}: expected a JSON object with 'law' and 'params' (what fit-curve --json prints)")
    law = doc.get("law")
    names = _check_law(law) if isinstance(law, str) else None
    if names is None:
        raise MiniCPMError(f"{source}: missing 'law' (tissue or mpl)")
    params = {}
    for name in names:
        value = doc["params"].get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MiniCPMError(f"{source}: params.{name} must be a finite number, got {value!r}")
        params[name] = float(value)
    return law, params


def load_fit_file(path: str | Path) -> tuple[str, dict[str, float]]:
    """(law, params) from a file holding the output of `fit-curve --json` (or `--out`)."""
    return load_fit_params(read_json_object(path), str(path))


def prediction_steps(last: int, every: Optional[int] = None) -> np.ndarray:
    """Steps 1..last every `every` steps (default: about 1000 rows), always ending at `last`."""
    every = every or max(1, math.ceil(last / 1000))
    return np.unique(np.concatenate([np.arange(every, last + 1, every), [last]])).astype(int)
