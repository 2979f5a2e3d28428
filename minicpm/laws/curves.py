"""Loss-curve laws: the loss at every step of a run as a function of its LR schedule.

- LR-annealing law (Tissue et al. 2024): L(s) = L0 + A·S1^-alpha − C·S2, S1 = Σ lr_i (i = 1..s),
  S2 = Σ m_i, m_i = lambda·m_{i−1} + (lr_{i−1} − lr_i).
- Multi-power law (Luo et al. 2025), as their code computes it (thu-yao-01-luo/MultiPowerLaw, `MPL.forward`):
  L(t) = L0 + A·S1(t)^-alpha − B·Σ_{k=1..t} (lr_{k−1} − lr_k)·G(lr_k^-gamma·S_k(t)),
  G(x) = 1 − (C·x + 1)^-beta, S1(t) = Σ_{tau=1..t} lr_tau, S_k(t) = Σ_{tau=k..t} lr_tau.
  The sum runs over every LR change from k = 1, warmup included: each warmup rise adds B·(lr_k − lr_{k−1})·G to
  the loss, and S1 includes the warmup's area (their S1 + S_W). Their published parameters are fitted to this
  form; a sum that starts after warmup lies ~0.1 nats below it at the end of their 25M cosine run.

The schedule is the LR at every step 0..T (lr[0] is the LR before the first update, their lr_0). For the
LR-annealing law warmup ends at the first step where the LR reaches its peak and m_i = 0 through warmup (the LR
rising during warmup is not annealing).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import least_squares, nnls
from scipy.signal import lfilter

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object
from minicpm.laws.chinchilla import single_threaded_blas
from minicpm.laws.tables import Curve, lr_per_step

LAWS: dict[str, tuple[str, ...]] = {
    "tissue": ("L0", "A", "alpha", "C", "lambda"),
    "mpl": ("L0", "A", "alpha", "B", "C", "beta", "gamma"),
}
FORMULAS = {
    "tissue": "L(s) = L0 + A*S1^-alpha - C*S2;  S2 = sum m_i, m_i = lambda*m_(i-1) + (lr_(i-1) - lr_i)",
    "mpl": "L(t) = L0 + A*S1(t)^-alpha - B*sum_(k=1..t) (lr_(k-1) - lr_k)*(1 - (C*lr_k^-gamma*S_k(t) + 1)^-beta)",
}
FIT_BLOCKS = 400
"""While fitting, the multi-power sum merges neighbouring LR changes into this many blocks: on 24k-step cosine,
linear and WSD schedules 400 blocks stay within 2e-5 of the exact sum, far below the noise of any loss curve, at a
small fraction of the cost per evaluation. predict_loss is always exact."""
PREDICT_CELLS = 4_000_000
"""predict_loss evaluates the exact multi-power sum on at most this many (step, LR change) pairs at a time."""


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


def _merge_changes(k: np.ndarray, dk: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """About max_blocks blocks of neighbouring LR changes, each acting at its change-weighted centre with the
    summed change. Rises and falls are never merged into one block (their changes would cancel); each run of
    them gets blocks in proportion to its changes, and a short warmup at least max_blocks/20 of them (the first
    steps after a warmup still feel its last rises)."""
    runs = np.split(np.arange(len(k)), 1 + np.flatnonzero(np.sign(dk[:-1]) != np.sign(dk[1:])))
    merged_k, merged_dk = [], []
    for run in runs:
        n_blocks = max(round(max_blocks * len(run) / len(k)), min(len(run), max_blocks // 20), 1)
        for block in np.array_split(run, n_blocks):
            merged_k.append(int(round(np.average(k[block], weights=np.abs(dk[block]) + 1e-300))))
            merged_dk.append(dk[block].sum())
    return np.array(merged_k), np.array(merged_dk)


class _MPLTerms:
    """What the multi-power law needs from one schedule: the area up to each step and, per LR change k (from
    k = 1, warmup rises included), its size lr_{k−1} − lr_k, log lr_k and S_k(t) (0 where k > t, and G(0) = 0).

    `ref` = (lr_ref, area_ref) centres the coupled pairs as fit.py centres log N: the terms hold area/area_ref and
    log(lr_k/lr_ref), so theta carries A' = A·area_ref^-alpha and C' = C·lr_ref^-gamma. In raw units log lr ≈ −8
    ties C to gamma (and A to alpha) along a narrow ridge that trust-region steps crawl along."""

    def __init__(self, lr: np.ndarray, steps: np.ndarray, ref: tuple[float, float] = (1.0, 1.0),
                 max_blocks: Optional[int] = None):
        cs = np.cumsum(lr)
        lr_ref, area_ref = ref
        self.area = (cs - lr[0])[steps] / area_ref
        k = 1 + np.flatnonzero(lr[:-1] != lr[1:])
        dk = lr[k - 1] - lr[k]
        if max_blocks is not None and len(k) > max_blocks:
            k, dk = _merge_changes(k, dk, max_blocks)
        floor = lr.max() * 1e-12
        self.dk = dk
        self.log_lr = np.log(np.maximum(lr[k], floor) / lr_ref)
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


def _terms(law: str, lr: np.ndarray, steps: np.ndarray, ref: tuple[float, float] = (1.0, 1.0),
           max_blocks: Optional[int] = None):
    return _TissueTerms(lr, steps) if law == "tissue" else _MPLTerms(lr, steps, ref, max_blocks)


def _check_law(law: str) -> tuple[str, ...]:
    if law not in LAWS:
        raise MiniCPMError(f"unknown loss-curve law {law!r}; choose {' or '.join(LAWS)}")
    return LAWS[law]


def _theta(law: str, params: dict[str, float], ref: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Internal coordinates: logs, lambda as log(1 − lambda), multi-power A and C centred on `ref` (_MPLTerms)."""
    v = dict(params)
    if law == "tissue":
        v["lambda"] = 1.0 - v["lambda"]  # lambda is fitted as log(1 − lambda)
    theta = np.log([v[n] for n in LAWS[law]])
    if law == "mpl":
        lr_ref, area_ref = ref
        theta[1] -= v["alpha"] * math.log(area_ref)
        theta[4] -= v["gamma"] * math.log(lr_ref)
    return theta


def _params(law: str, theta: np.ndarray, ref: tuple[float, float] = (1.0, 1.0)) -> dict[str, float]:
    theta = np.array(theta, dtype=float)
    if law == "mpl":
        lr_ref, area_ref = ref
        theta[1] += math.exp(theta[2]) * math.log(area_ref)
        theta[4] += math.exp(theta[6]) * math.log(lr_ref)
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
    changes = int(np.count_nonzero(lr[:-1] != lr[1:]))
    rows = len(steps) if law == "tissue" else max(1, PREDICT_CELLS // max(1, changes))  # multi-power: rows x changes
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
    cost: Optional[float] = None
    """The Huber cost at the optimum (fit_objective computes it at any parameters)."""
    method: str = "optimum"
    """How it was fitted: one of FIT_METHODS."""

    def to_json(self) -> dict:
        return {"law": self.law, "formula": FORMULAS[self.law], "method": self.method, "params": self.params,
                "huber_delta": self.delta,
                "at_bound": self.at_bound, "cost": self.cost, "curves": [vars(c) for c in self.curves]}


@dataclass
class _Data:
    name: str
    terms: object
    loss: np.ndarray


def _pick(steps: np.ndarray, loss: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most max_points of a curve, evenly spaced in step: the laws' cost grows with the points."""
    if len(steps) <= max_points:
        return steps, loss
    pick = np.unique(np.linspace(0, len(steps) - 1, max_points).round().astype(int))
    return steps[pick], loss[pick]


def _prepare(law: str, curves: Sequence[Curve], min_step: int, max_points: int, screen_points: int = 0,
             centre: bool = True) -> tuple[list[_Data], list[_Data], tuple[float, float]]:
    """The curves as fit data, a smaller subset for screening the start grid, and the centring reference
    (the highest LR, the geometric mean of the areas at the points; (1, 1), raw units, without `centre`)."""
    kept = []
    for cv in curves:
        last = int(max(cv.lr_steps[-1], cv.loss_steps[-1]))
        lr = lr_per_step(cv.lr_steps, cv.lr, last)
        if lr.max() <= 0:
            raise MiniCPMError(f"{cv.name}: the LR is 0 everywhere")
        keep = (cv.loss_steps > warmup_end(lr)) & (cv.loss_steps >= max(min_step, 1))
        steps, loss = _pick(cv.loss_steps[keep].astype(int), cv.loss[keep], max_points)
        if len(steps):
            kept.append((cv.name, lr, steps, loss))
    if not kept:
        return [], [], (1.0, 1.0)
    areas = np.concatenate([(np.cumsum(lr) - lr[0])[steps] for _, lr, steps, _ in kept])
    ref = (float(max(lr.max() for _, lr, _, _ in kept)), float(np.exp(np.log(areas).mean()))) if centre else (1.0, 1.0)
    data = [_Data(name, _terms(law, lr, steps, ref, FIT_BLOCKS), loss) for name, lr, steps, loss in kept]
    if not screen_points:
        return data, data, ref
    screen = []
    for name, lr, steps, loss in kept:
        steps, loss = _pick(steps, loss, screen_points)
        screen.append(_Data(name, _terms(law, lr, steps, ref, FIT_BLOCKS), loss))
    return data, screen, ref


# The multi-power law's start grid, in the centred coordinates of _MPLTerms: each exponent over its plausible
# range (Luo et al. 2025 fit alpha 0.43–0.51, beta 0.58–0.60, gamma 0.63–0.66 for 25M–400M models) and, for C,
# the response one step at the peak LR gives, x = C·lr_peak^(1−gamma) (theirs: 2·(3e-4)^0.4 ≈ 0.08, an annealing
# that settles over tens of steps), from 1e-3 (thousands of steps) to 1 (one step).
MPL_GRID = {"alpha": (0.2, 0.35, 0.5, 0.7), "beta": (0.3, 0.5, 0.7, 1.0), "gamma": (0.3, 0.5, 0.7, 0.9),
            "response": (1e-3, 1e-2, 1e-1, 1.0)}


def _linear_solve(columns: list[np.ndarray], obs: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least squares of the relative residuals for the coefficients of the given columns."""
    f = np.stack(columns, axis=1)
    lin, res = nnls(f / obs[:, None], np.ones_like(obs))
    return np.maximum(lin, 1e-8 * obs.mean()), float(res)


def _starts(law: str, data: list[_Data], n_starts: int, ref: tuple[float, float]) -> list[np.ndarray]:
    """Variable projection on a grid: for fixed exponents the laws are linear in (L0, A, C) or (L0, A, B), which
    non-negative least squares (relative residuals) solves. For the multi-power law the best point of each gamma
    row starts a refinement, best first: gamma and C trade off along a long, flat valley, and starts spread along
    it reach the deepest part of it where neighbouring grid points would all fall into one local dip."""
    obs = np.concatenate([d.loss for d in data])
    ones = np.ones_like(obs)
    scored = []
    if law == "tissue":
        for alpha in (0.2, 0.4, 0.6, 0.9):
            for one_minus_lam in (1e-1, 1e-2, 1e-3, 1e-4):
                anneal = np.concatenate([-d.terms.annealing_area(1.0 - one_minus_lam)[0] for d in data])
                power = np.concatenate([d.terms.s1 ** -alpha for d in data])
                lin, res = _linear_solve([ones, power, anneal], obs)
                scored.append((res, None, [math.log(lin[0]), math.log(lin[1]), math.log(alpha), math.log(lin[2]),
                                           math.log(one_minus_lam)]))
        scored.sort(key=lambda s: s[0])
        return [np.array(s[2]) for s in scored[:n_starts]]
    lr_ref = ref[0]
    log_area = np.concatenate([np.log(d.terms.area) for d in data])
    for gamma in MPL_GRID["gamma"]:
        for beta in MPL_GRID["beta"]:
            for response in MPL_GRID["response"]:
                c = response / lr_ref  # C' = C·lr_ref^-gamma, and x per peak step = C'·lr_ref
                anneal = -np.concatenate([d.terms.annealing_features(c, beta, gamma) for d in data])
                for alpha in MPL_GRID["alpha"]:
                    lin, res = _linear_solve([ones, np.exp(-alpha * log_area), anneal], obs)
                    scored.append((res, gamma, [math.log(lin[0]), math.log(lin[1]), math.log(alpha),
                                                math.log(lin[2]), math.log(c), math.log(beta), math.log(gamma)]))
    scored.sort(key=lambda s: s[0])
    best_per_gamma: dict[float, list] = {}
    for res, gamma, theta in scored:
        best_per_gamma.setdefault(gamma, theta)
    return [np.array(theta) for theta in list(best_per_gamma.values())[:n_starts]]


def _bounds(law: str, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo_l0, hi_l0 = math.log(obs.min() * 1e-3), math.log(obs.max())
    if law == "tissue":  # L0, A, alpha, C, log(1 − lambda)
        return np.array([lo_l0, -40, math.log(1e-3), -40, math.log(1e-7)]), \
            np.array([hi_l0, 40, math.log(3.0), 40, math.log(0.5)])
    return np.array([lo_l0, -40, math.log(1e-3), -40, -40, math.log(1e-3), math.log(1e-3)]), \
        np.array([hi_l0, 40, math.log(3.0), 40, 40, math.log(10.0), math.log(3.0)])


def _huber_cost(r: np.ndarray, delta: float) -> float:
    """scipy least_squares' cost with loss='huber', f_scale=delta: sum of delta²·rho(r²/delta²)/2."""
    a = np.abs(r)
    return float(np.sum(np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))))


FIT_METHODS = ("optimum", "luo")
"""optimum: the deepest optimum of the Huber objective (multi-start trust region); luo: Luo et al.'s own procedure
for the multi-power law, which stops early (fit_mpl_as_luo)."""


def default_fit_method(law: str) -> str:
    """luo for the multi-power law, optimum for the others. On the authors' logged training curves (25M-400M) their
    early-stopped fit predicts the held-out schedules better (test mean 0.110/0.142/0.168%) than the objective's
    optimum (0.138/0.165/0.216%); the optimum wins only on noise-free curves the law itself generates."""
    return "luo" if law == "mpl" else "optimum"


def _require_a_decay(law: str, data) -> None:
    if all(not np.any((d.terms.dk if law == "mpl" else d.terms.delta) > 0) for d in data):
        raise MiniCPMError(f"no curve's LR decreases after warmup, so the annealing part of law {law!r} cannot be "
                           f"fitted: add a curve with a decay (cosine or WSD)")


@single_threaded_blas
def fit_curve_law(law: str, curves: Sequence[Curve], *, delta: float = 1e-3, min_step: int = 0,
                  max_points: int = 200, n_starts: int = 4, screen_points: int = 60,
                  method: str | None = None) -> CurveFit:
    """Fit a loss-curve law to one or more curves: Huber (scale delta) on relative residuals, trust-region
    least squares with analytic Jacobians, from the best points of a variable-projection grid over each
    parameter's plausible range (screened on `screen_points` points per curve), keeping the deepest optimum.
    method="luo" fits the multi-power law by Luo et al.'s procedure instead (fit_mpl_as_luo); None takes
    default_fit_method(law).

    Points up to the end of warmup (and before min_step) are left out: both laws describe the curve after it.
    """
    names = _check_law(law)
    method = method or default_fit_method(law)
    if method not in FIT_METHODS:
        raise MiniCPMError(f"unknown loss-curve fit method {method!r}; choose {' or '.join(FIT_METHODS)}")
    if method == "luo":
        if law != "mpl":
            raise MiniCPMError(f"method 'luo' fits the multi-power law (mpl), not {law!r}")
        return fit_mpl_as_luo(curves, min_step=min_step, max_points=max_points)
    data, screen, ref = _prepare(law, curves, min_step, max_points, screen_points if law == "mpl" else 0)
    n = sum(len(d.loss) for d in data)
    if n <= len(names):
        raise MiniCPMError(f"{n} loss points after warmup; law {law!r} has {len(names)} parameters: "
                           f"give longer or more curves")
    _require_a_decay(law, data)
    obs = np.concatenate([d.loss for d in data])

    def residuals(theta):
        return np.concatenate([d.terms.predict(theta) / d.loss - 1.0 for d in data])

    def jacobian(theta):
        return np.concatenate([d.terms.predict(theta, jac=True)[1] / d.loss[:, None] for d in data])

    lo, hi = _bounds(law, obs)
    best = None
    for theta0 in _starts(law, screen, n_starts, ref):
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                res = least_squares(residuals, np.clip(theta0, lo + 1e-9, hi - 1e-9), jac=jacobian,
                                    bounds=(lo, hi), loss="huber", f_scale=delta, method="trf",
                                    x_scale="jac", max_nfev=300, xtol=1e-12, ftol=1e-12, gtol=1e-12)
        except ValueError:
            continue  # the start produced a non-finite residual
        if res.status < 0 or not np.all(np.isfinite(res.fun)):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        raise MiniCPMError(f"the {law!r} loss-curve fit did not converge from any start")
    params = _params(law, best.x, ref)
    if not all(math.isfinite(v) for v in params.values()):
        raise MiniCPMError(f"the {law!r} loss-curve fit gave non-finite parameters")
    stats = []
    for d in data:
        rel = d.terms.predict(best.x) / d.loss - 1.0
        stats.append(CurveStats(d.name, len(rel), float(np.sqrt(np.mean(rel ** 2))), float(np.abs(rel).max())))
    at_bound = [n for n, v, a, b in zip(names, best.x, lo, hi) if min(v - a, b - v) < 1e-6]
    return CurveFit(law, params, delta, stats, at_bound, float(best.cost))


# Luo et al. (2025), thu-yao-01-luo/MultiPowerLaw src/config.py and src/fitting.py: AdamW on the raw parameters at
# 5e-2 (L0, A, B, C) and 5e-3 (alpha, beta, gamma), torch's defaults otherwise (betas 0.9/0.999, eps 1e-8,
# weight decay 0.01), at most 200 steps, stopped after 20 steps without a lower objective or at gradient norm 1e-5.
LUO_ADAM_LR = np.array([5e-2, 5e-2, 5e-3, 5e-2, 5e-2, 5e-3, 5e-3])
LUO_MAX_STEPS, LUO_PATIENCE, LUO_GRAD_NORM = 200, 20, 1e-5
LUO_DELTA = 1e-3


def _luo_start(data: list[_Data], curves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Their initialisation: L0, A, alpha, B of L0 + A·S1^-alpha − B·(lr_peak − lr_t) by L-BFGS-B from a 5x3x3x3
    grid around a log-log line through the data, then C = 1, beta = gamma = 0.5. Their B grid (100..1000 at peak
    3e-4) is scaled to the curves' peak LR, as B·lr_peak is what the term measures."""
    from scipy.optimize import minimize
    from scipy.stats import linregress

    loss = np.concatenate([d.loss for d in data])
    area = np.concatenate([np.cumsum(lr)[steps] for lr, steps in curves])
    lr_t = np.concatenate([lr[steps] for lr, steps in curves])
    peak = max(lr.max() for lr, _ in curves)
    line = linregress(np.log(area), np.log(loss - loss.min() + 0.01))

    def objective(p):
        with np.errstate(invalid="ignore", divide="ignore"):
            pred = p[0] + p[1] * area ** -p[2] - p[3] * (peak - lr_t)
            value = _huber_cost(np.log(loss) - np.log(pred), LUO_DELTA)
        return value if math.isfinite(value) else 1e300

    grid = itertools.product(np.linspace(loss.min() - 0.2, loss.min() + 0.2, 5),
                             math.exp(line.intercept) + np.array([-0.1, 0.0, 0.1]),
                             -line.slope + np.array([-0.1, 0.0, 0.1]), np.linspace(0.03, 0.3, 3) / peak)
    best = min((minimize(objective, p0, method="L-BFGS-B", bounds=[(0, None)] * 4,
                         options={"maxiter": 100000, "ftol": 1e-9, "gtol": 1e-6}) for p0 in grid),
               key=lambda r: r.fun)
    return np.array([*best.x, 1.0, 0.5, 0.5])


def fit_mpl_as_luo(curves: Sequence[Curve], *, min_step: int = 0, max_points: int = 200) -> CurveFit:
    """The multi-power law fitted as Luo et al. fit it: Huber (delta 1e-3) on log residuals, their initialisation
    (_luo_start), then early-stopped AdamW; the parameters kept are those after the step with the lowest objective.

    It stops far from the objective's optimum (on their 25M curves at twice the optimum's cost), and that is what
    their published parameters are: on their own held-out schedules these predict better (test mean 0.110%,
    0.142%, 0.168% for 25M/100M/400M) than the optimum does (0.138%, 0.165%, 0.216%), while on curves the law
    itself generates the optimum predicts ~5x better. Its step sizes are theirs, set for losses of ~3 nats and a
    peak LR of ~3e-4."""
    data, _, _ = _prepare("mpl", curves, min_step, max_points, centre=False)
    if sum(len(d.loss) for d in data) <= len(LAWS["mpl"]):
        raise MiniCPMError("too few loss points after warmup for the 7 parameters of the multi-power law")
    _require_a_decay("mpl", data)
    kept = []
    for cv in curves:  # the same steps _prepare kept, for the initialisation's log-log line
        lr = lr_per_step(cv.lr_steps, cv.lr, int(max(cv.lr_steps[-1], cv.loss_steps[-1])))
        keep = (cv.loss_steps > warmup_end(lr)) & (cv.loss_steps >= max(min_step, 1))
        if keep.any():
            kept.append((lr, _pick(cv.loss_steps[keep].astype(int), cv.loss[keep], max_points)[0]))
    p = _luo_start(data, kept)
    m, v = np.zeros(7), np.zeros(7)
    best_cost, best_p, lowest, stale = math.inf, p.copy(), math.inf, 0
    for step in range(1, LUO_MAX_STEPS + 1):
        cost, grad = 0.0, np.zeros(7)
        for d in data:
            pred, jac = d.terms.predict(np.log(p), jac=True)  # jac is d pred / d log p
            r = np.log(d.loss) - np.log(pred)
            cost += _huber_cost(r, LUO_DELTA)
            grad += (-np.clip(r, -LUO_DELTA, LUO_DELTA) / pred) @ jac / p
        p = p * (1 - LUO_ADAM_LR * 0.01)  # AdamW's decoupled weight decay, then the Adam step
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        p = p - LUO_ADAM_LR * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
        lowest, stale = (cost, 0) if cost < lowest else (lowest, stale + 1)
        if (step > LUO_PATIENCE + 1 and stale >= LUO_PATIENCE) or np.linalg.norm(grad) < LUO_GRAD_NORM:
            break
        if cost < best_cost:
            best_cost, best_p = cost, p.copy()
        if not np.all(p > 0):
            break  # a parameter crossed zero: the law is undefined beyond it
    params = dict(zip(LAWS["mpl"], best_p.tolist()))
    stats = []
    for d in data:
        rel = d.terms.predict(np.log(best_p)) / d.loss - 1.0
        stats.append(CurveStats(d.name, len(rel), float(np.sqrt(np.mean(rel ** 2))), float(np.abs(rel).max())))
    return CurveFit("mpl", params, LUO_DELTA, stats, [], best_cost, method="luo")


def fit_objective(fit_or_law, curves: Sequence[Curve], params: Optional[dict[str, float]] = None, *,
                  delta: float = 1e-3, min_step: int = 0, max_points: int = 200) -> float:
    """The Huber cost fit_curve_law minimises, at `params` (default: the fit's own), on the same points."""
    law = fit_or_law.law if isinstance(fit_or_law, CurveFit) else fit_or_law
    params = params if params is not None else fit_or_law.params
    data, _, ref = _prepare(law, curves, min_step, max_points)
    theta = _theta(law, params, ref)
    return _huber_cost(np.concatenate([d.terms.predict(theta) / d.loss - 1.0 for d in data]), delta)


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
