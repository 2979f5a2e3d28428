"""Scaling-law fits: L(N, D) by Chinchilla's approach 3 with bootstrap intervals, the compute-optimal allocation,
isoFLOP profiles (approach 2), the loss-versus-compute envelope and the optimal batch-size law.

Formulas: DESIGN §3 and paper §4.5 / App. B. N is non-embedding parameters, D tokens, C = 6·N·D FLOPs.
Every number a fit returns is finite; a fit that cannot give one raises MiniCPMError instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.optimize import minimize
from tqdm import tqdm

from minicpm.errors import MiniCPMError
from minicpm.laws import BOOTSTRAP_RESAMPLES, CONFIDENCE
from minicpm.laws.tables import RunTable
from minicpm.laws.variants import LawVariant, law_variant

PARAMS = ("E", "A", "B", "alpha", "beta")
PAPER_NAMES = {"E": "L0", "A": "C_N", "B": "C_D", "alpha": "alpha", "beta": "beta"}


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta; the paper writes E, A, B as L0, C_N, C_D."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A * np.power(n, -self.alpha) + self.B * np.power(d, -self.beta)

    @property
    def K(self) -> float:
        """K = (alpha·C_N / (beta·C_D))^(1/(alpha+beta)) (paper §4.5)."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def eta(self) -> float:
        """eta = (beta − alpha)/(alpha + beta): N_opt/D_opt = K²·(C/6)^eta."""
        return (self.beta - self.alpha) / (self.alpha + self.beta)

    def n_opt(self, flops):
        """The N minimising L at compute C = 6·N·D: N_opt = K·(C/6)^(beta/(alpha+beta))."""
        return self.K * np.power(np.asarray(flops, dtype=float) / 6.0, self.beta / (self.alpha + self.beta))

    def d_opt(self, flops):
        """D_opt = (C/6)/N_opt = (C/6)^(alpha/(alpha+beta)) / K."""
        return np.asarray(flops, dtype=float) / 6.0 / self.n_opt(flops)

    def as_dict(self) -> dict[str, float]:
        return {p: float(getattr(self, p)) for p in PARAMS}


@dataclass
class ChinchillaFit:
    law: ScalingLaw
    objective: float
    """Mean Huber loss of the log-loss residuals, divided by delta."""
    delta: float
    n_points: int
    starts: int
    """Number of L-BFGS starts taken from the grid."""
    theta: np.ndarray = field(repr=False)
    """The optimum in the internal coordinates (a', alpha, b', beta, e), a warm start for bootstrap refits."""
    centre: tuple[float, float] = (0.0, 0.0)
    method: str = "huber"
    """huber: approach 3 on log loss (objective: mean Huber / delta); lsq: least squares on the raw loss, as the
    paper's curve_fit (objective: RMSE of the loss)."""
    variant: str = "chinchilla"
    """Which form of the law (laws/variants.py): what bootstrap and held-out refits fit again."""


# ------------------------------------------------------------------------------------------- BLAS threads

@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def single_threaded_blas(fn: Callable) -> Callable:
    """Run `fn` with one BLAS thread. L-BFGS-B and least squares call BLAS on 5x5 to 10x10 matrices; OpenBLAS
    threads there cost up to 80x in wall time when the cores are busy (measured on the 2-core build machine).
    Needs threadpoolctl; without it BLAS keeps its default threads."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        controller = _blas_controller()
        with controller.limit(limits=1) if controller else contextlib.nullcontext():
            return fn(*args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------------------------- approach 3

def _log_model(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log(E + A·N^-alpha + B·D^-beta) for one or many theta = (a', alpha, b', beta, e) (rows of a 2-D array).

    x, y are log N and log D centred on the data: with a' = log A − alpha·x̄ the strong a–alpha correlation
    that raw log N (~20) causes is gone, which L-BFGS needs.
    """
    theta = np.atleast_2d(theta)
    t1 = theta[:, :1] - theta[:, 1:2] * x
    t2 = theta[:, 2:3] - theta[:, 3:4] * y
    t3 = theta[:, 4:5]
    top = np.maximum(np.maximum(t1, t2), t3)
    return top + np.log(np.exp(t1 - top) + np.exp(t2 - top) + np.exp(t3 - top))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_of_log_sum(terms: list[np.ndarray], logl: np.ndarray, delta: float, weights: Optional[np.ndarray] = None):
    """mean of weight·Huber_delta(log Σ exp(terms) − log L) / delta (weights of mean 1, or none), and d(it)/d(term_j)
    for each term (value, list)."""
    top = np.maximum.reduce(terms)
    w = [np.exp(t - top) for t in terms]
    total = sum(w)
    r = top + np.log(total) - logl
    weights = np.ones_like(r) if weights is None else weights
    psi = weights * np.clip(r, -delta, delta) / (delta * len(r) * total)  # d/d(log-sum), with the softmax weight
    return float((weights * _huber(r, delta)).mean() / delta), [psi * wj for wj in w]


def _objective(theta, x, y, logl, delta, weights=None):
    """Chinchilla approach 3 on (a', alpha, b', beta, e): the value and its gradient."""
    a, alpha, b, beta, e = theta
    value, (g1, g2, g3) = _huber_of_log_sum([a - alpha * x, b - beta * y, np.full_like(x, e)], logl, delta, weights)
    return value, np.array([g1.sum(), -g1 @ x, g2.sum(), -g2 @ y, g3.sum()])


def _shared_objective(phi, x, y, logl, delta, weights=None):
    """_objective on (a', alpha, b', e) with beta = alpha (Gadre et al. 2024)."""
    value, g = _objective(_unshare(phi), x, y, logl, delta, weights)
    return value, np.array([g[0], g[1] + g[3], g[2], g[4]])


def _unshare(phi: np.ndarray) -> np.ndarray:
    a, alpha, b, e = phi
    return np.array([a, alpha, b, alpha, e])


def _grid(loss: np.ndarray) -> np.ndarray:
    """Starting points in internal coordinates, scaled to the data's loss level."""
    lmin, lmean = loss.min(), loss.mean()
    e = np.log(lmin * np.array([0.1, 0.3, 0.5, 0.7, 0.85, 0.95]))
    a = np.log(lmean * np.array([0.02, 0.1, 0.3, 1.0]))
    exps = np.array([0.1, 0.2, 0.35, 0.5, 0.8, 1.2])
    g = np.meshgrid(a, exps, a, exps, e, indexing="ij")
    return np.stack([v.ravel() for v in g], axis=-1)


def _bounds(loss: np.ndarray) -> list[tuple[float, float]]:
    lo, hi = math.log(loss.min()), math.log(loss.max())
    return [(lo - 20, hi + 7), (1e-3, 5.0), (lo - 20, hi + 7), (1e-3, 5.0), (lo - 20, hi)]


def _check_design(n: np.ndarray, d: np.ndarray, source: str) -> None:
    if len(n) <= len(PARAMS):
        raise MiniCPMError(f"{source}: {len(n)} points, but L(N, D) has {len(PARAMS)} parameters: "
                           f"give at least {len(PARAMS) + 1} runs")
    for name, v in (("params", n), ("tokens", d)):
        k = len(np.unique(v))
        if k < 3:
            raise MiniCPMError(f"{source}: column {name!r} has {k} distinct value(s); alpha and beta need at "
                               f"least 3 distinct model sizes and 3 distinct token counts")


@single_threaded_blas
def fit_chinchilla(params, tokens, loss, *, delta: float = 1e-3, n_starts: int = 8,
                   warm_start: Optional[ChinchillaFit] = None, source: str = "table",
                   variant: LawVariant | str = "chinchilla") -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta by L-BFGS on a Huber loss of log-loss residuals (Hoffmann et al. 2022,
    approach 3), starting from the best `n_starts` points of a grid (plus `warm_start`, when given). `variant`
    (laws/variants.py) may share one exponent, weight runs by compute or bound E by the lowest loss.

    The grid is screened on its objective value first and L-BFGS runs only from the best points: the full
    Chinchilla grid of L-BFGS runs costs 100x more and, on our tests, finds the same optimum.
    """
    variant = law_variant(variant) if isinstance(variant, str) else variant
    n, d, loss = (np.asarray(v, dtype=float) for v in (params, tokens, loss))
    _check_design(n, d, source)
    if delta <= 0:
        raise MiniCPMError(f"huber delta must be positive, got {delta}")
    centre = warm_start.centre if warm_start else (float(np.log(n).mean()), float(np.log(d).mean()))
    x, y, logl = np.log(n) - centre[0], np.log(d) - centre[1], np.log(loss)
    weights = variant.weights(n, d)
    starts = [warm_start.theta] if warm_start is not None else []
    bounds = _bounds(loss)
    if variant.e_below_min_loss:
        bounds[4] = (bounds[4][0], math.log(loss.min()))
    if n_starts:
        grid = _grid(loss)
        if variant.shared_exponent:
            grid = grid[grid[:, 1] == grid[:, 3]]
        grid = grid[grid[:, 4] <= bounds[4][1]]
        values = ((weights if weights is not None else 1.0) * _huber(_log_model(grid, x, y) - logl, delta)).mean(-1)
        starts += list(grid[np.argsort(values)[:n_starts]])
    objective = _shared_objective if variant.shared_exponent else _objective
    free = [0, 1, 2, 4] if variant.shared_exponent else [0, 1, 2, 3, 4]
    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, [b[0] for b in bounds], [b[1] for b in bounds])[free]
        res = minimize(objective, theta0, args=(x, y, logl, delta, weights), jac=True, method="L-BFGS-B",
                       bounds=[bounds[i] for i in free], options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
        if res.status == 1 or not np.all(np.isfinite(res.x)) or not np.isfinite(res.fun):
            continue  # ran out of iterations or overflowed: not a converged start
        if best is None or res.fun < best.fun:
            best = res
    if best is None:
        raise MiniCPMError(f"{source}: the L(N, D) fit did not converge from any of {len(starts)} starts")
    theta = _unshare(best.x) if variant.shared_exponent else best.x
    for name, i in (("alpha", 1), ("beta", 3)):
        lo, hi = bounds[i]
        if not lo * 1.0001 < theta[i] < hi * 0.9999:
            raise MiniCPMError(f"{source}: the fit did not converge: {name} ran to its bound ({theta[i]:.4g}); "
                               f"the data do not determine it")
    a, alpha, b, beta, e = theta
    law = ScalingLaw(E=math.exp(e), A=math.exp(a + alpha * centre[0]), B=math.exp(b + beta * centre[1]),
                     alpha=float(alpha), beta=float(beta))
    if not all(math.isfinite(v) and v > 0 for v in law.as_dict().values()):
        raise MiniCPMError(f"{source}: the fit did not converge to finite parameters ({law})")
    return ChinchillaFit(law, float(best.fun), delta, len(loss), len(starts), theta.copy(), centre,
                         variant=variant.name)


def _raw_model(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """E + A·N^-alpha + B·D^-beta for one or many theta in the internal coordinates of _log_model."""
    return np.exp(_log_model(theta, x, y))


@single_threaded_blas
def fit_lsq(params, tokens, loss, *, n_starts: int = 8, warm_start: Optional[ChinchillaFit] = None,
            source: str = "table", **_ignored) -> ChinchillaFit:
    """Fit L = L0 + C_N·N^-alpha + C_D·D^-beta by least squares on the raw loss, as the paper does with scipy's
    curve_fit (§4.5): scipy's trust-region reflective least squares (what curve_fit runs under bounds) in the
    coordinates of fit_chinchilla, from the grid points with the smallest squared error (and `warm_start`)."""
    from scipy.optimize import least_squares

    n, d, loss = (np.asarray(v, dtype=float) for v in (params, tokens, loss))
    _check_design(n, d, source)
    centre = warm_start.centre if warm_start else (float(np.log(n).mean()), float(np.log(d).mean()))
    x, y = np.log(n) - centre[0], np.log(d) - centre[1]
    starts = [warm_start.theta] if warm_start is not None else []
    if n_starts:
        grid = _grid(loss)
        sse = ((_raw_model(grid, x, y) - loss) ** 2).sum(axis=-1)
        starts += list(grid[np.argsort(sse)[:n_starts]])
    bounds = _bounds(loss)
    lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])

    def residuals(theta):
        return _raw_model(theta, x, y)[0] - loss

    def jacobian(theta):
        a, alpha, b, beta, e = theta
        t1, t2 = np.exp(a - alpha * x), np.exp(b - beta * y)
        return np.stack([t1, -x * t1, t2, -y * t2, np.full_like(x, math.exp(e))], axis=1)

    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, lo + 1e-9, hi - 1e-9)
        with np.errstate(over="ignore", invalid="ignore"):
            res = least_squares(residuals, theta0, jac=jacobian, bounds=(lo, hi), method="trf", x_scale="jac",
                                ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=500)
        # status 0 (the evaluation limit) is kept: on a table that does not determine L0, E crawls towards 0 along
        # a flat valley while the loss and the other parameters no longer move
        if res.status < 0 or not np.all(np.isfinite(res.x)) or not np.isfinite(res.cost):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        raise MiniCPMError(f"{source}: the least-squares L(N, D) fit did not converge from any of {len(starts)} "
                           f"starts")
    for name, i in (("alpha", 1), ("beta", 3)):
        if not bounds[i][0] * 1.0001 < best.x[i] < bounds[i][1] * 0.9999:
            raise MiniCPMError(f"{source}: the fit did not converge: {name} ran to its bound ({best.x[i]:.4g}); "
                               f"the data do not determine it")
    a, alpha, b, beta, e = best.x
    law = ScalingLaw(E=math.exp(e), A=math.exp(a + alpha * centre[0]), B=math.exp(b + beta * centre[1]),
                     alpha=float(alpha), beta=float(beta))
    if not all(math.isfinite(v) and v > 0 for v in law.as_dict().values()):
        raise MiniCPMError(f"{source}: the fit did not converge to finite parameters ({law})")
    rmse = float(np.sqrt(2.0 * best.cost / len(loss)))
    return ChinchillaFit(law, rmse, 0.0, len(loss), len(starts), best.x.copy(), centre, method="lsq")


METHODS = {"huber": fit_chinchilla, "lsq": fit_lsq}
"""`minicpm scaling fit --method`: Huber on log loss (Chinchilla approach 3, the default) or least squares on the
raw loss (the paper's curve_fit)."""


def fit_law(method: str, params, tokens, loss, *, variant: str = "chinchilla", **kwargs) -> ChinchillaFit:
    """Fit by `method`; the variants (laws/variants.py) are Huber fits, the paper's least squares fits its own law."""
    if method not in METHODS:
        raise MiniCPMError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "lsq":
        if variant != "chinchilla":
            raise MiniCPMError(f"--law {variant!r}: the least-squares fit (--method lsq, the paper's curve_fit) fits "
                               f"the paper's law with free exponents; use --law chinchilla or --method huber")
        return fit_lsq(params, tokens, loss, **kwargs)
    return fit_chinchilla(params, tokens, loss, variant=variant, **kwargs)


# ------------------------------------------------------------------------------------------- bootstrap

@dataclass
class Bootstrap:
    """Refits on resampled runs; percentile intervals of any quantity computed from the refitted laws."""

    laws: list
    failed: int
    confidence: float

    def interval(self, values: Sequence[float]) -> tuple[float, float]:
        tail = 50.0 * (1.0 - self.confidence)
        lo, hi = np.percentile(np.asarray(values, dtype=float), [tail, 100.0 - tail])
        return float(lo), float(hi)

    def intervals(self) -> dict[str, tuple[float, float]]:
        return {p: self.interval([getattr(law, p) for law in self.laws]) for p in PARAMS}


def _check_bootstrap(n_boot: int, confidence: float) -> None:
    if n_boot < 10:
        raise MiniCPMError(f"bootstrap resamples must be at least 10, got {n_boot}")
    if not 0 < confidence < 1:
        raise MiniCPMError(f"confidence must be in (0, 1), got {confidence}")


def run_groups(runs: Sequence[str]) -> list[np.ndarray]:
    """Row indices of each run (rows sharing a `run` label): the units a bootstrap resamples."""
    _, inverse = np.unique(np.asarray(runs, dtype=object).astype(str), return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


def resample_groups(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Row indices of a bootstrap resample: as many runs as there are, drawn whole and with replacement."""
    return np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])


@single_threaded_blas
def bootstrap_chinchilla(table: RunTable, fit: ChinchillaFit, *, n_boot: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                         seed: int = 0, n_starts: int = 0, progress: bool = False) -> Bootstrap:
    """Percentile bootstrap over runs: each resample is refitted from the full fit's optimum (and the best
    `n_starts` grid points, when asked). A resample that cannot be fitted (too few distinct sizes drawn, no
    convergence) is counted in `failed`; more than half failing is an error."""
    _check_bootstrap(n_boot, confidence)
    rng = np.random.default_rng(seed)
    groups = run_groups(table.run)
    laws: list[ScalingLaw] = []
    failed = 0
    for _ in tqdm(range(n_boot), desc="bootstrap", disable=not progress, leave=False):
        idx = resample_groups(groups, rng)
        try:
            refit = fit_law(fit.method, table.params[idx], table.tokens[idx], table.loss[idx],
                            delta=fit.delta, n_starts=n_starts, warm_start=fit, variant=fit.variant)
        except MiniCPMError:
            failed += 1
            continue
        laws.append(refit.law)
    if len(laws) < max(10, n_boot // 2):
        raise MiniCPMError(f"{table.source}: only {len(laws)} of {n_boot} bootstrap resamples could be fitted; "
                           f"add runs (more sizes or token counts)")
    return Bootstrap(laws, failed, confidence)


# ------------------------------------------------------------------------------------------- goodness of fit

@dataclass
class HeldOut:
    """Error on rows left out of the fit: extrapolation to the largest size, or to the longest runs."""

    label: str
    n_fit: int
    n_held: int
    mean_abs_rel_err: Optional[float] = None
    max_abs_rel_err: Optional[float] = None
    skipped: Optional[str] = None


def held_out_error(table: RunTable, held: np.ndarray, label: str, delta: float, method: str = "huber",
                   variant: str = "chinchilla") -> HeldOut:
    keep = ~held
    try:
        fit = fit_law(method, table.params[keep], table.tokens[keep], table.loss[keep], delta=delta,
                      source=f"{label} held out", variant=variant)
    except MiniCPMError as e:
        return HeldOut(label, int(keep.sum()), int(held.sum()), skipped=str(e).split(": ", 1)[-1])
    rel = fit.law.loss(table.params[held], table.tokens[held]) / table.loss[held] - 1.0
    return HeldOut(label, int(keep.sum()), int(held.sum()), float(np.abs(rel).mean()), float(np.abs(rel).max()))


@single_threaded_blas
def held_out_checks(table: RunTable, delta: float, method: str = "huber", variant: str = "chinchilla") -> list[HeldOut]:
    """Refit without (a) every run of the largest size, (b) the longest run of each size; predict what was left out."""
    largest = table.params == table.params.max()
    longest = np.zeros(len(table), dtype=bool)
    for n in np.unique(table.params):
        rows = table.params == n
        longest |= rows & (table.tokens == table.tokens[rows].max())
    return [held_out_error(table, largest, f"largest size (N={table.params.max():.3g})", delta, method, variant),
            held_out_error(table, longest, "longest run of each size", delta, method, variant)]


# ------------------------------------------------------------------------------------------- isoFLOP, envelope

@dataclass
class IsoflopProfile:
    flops: float
    n_opt: float
    d_opt: float
    loss: float
    sizes: int


@dataclass
class IsoflopFit:
    """Approach 2: per compute budget, the minimum of a parabola in log N; then N_opt ∝ C^a, D_opt ∝ C^b."""

    profiles: list[IsoflopProfile]
    a: Optional[float] = None
    b: Optional[float] = None
    skipped: list[str] = field(default_factory=list)


def fit_isoflop(table: RunTable, rel_tol: float = 0.05) -> IsoflopFit:
    """Group rows whose compute agrees within rel_tol; fit loss = p(log N) (degree 2) in each group that has at
    least 3 sizes; keep the minima that are inside the sizes tried."""
    c = table.compute()
    order = np.argsort(c)
    groups: list[list[int]] = []
    for i in order:
        if groups and c[i] <= c[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(i)
        else:
            groups.append([i])
    out = IsoflopFit([])
    for g in groups:
        g = np.array(g)
        sizes = len(np.unique(table.params[g]))
        if sizes < 3:
            continue
        budget = float(np.exp(np.log(c[g]).mean()))
        x = np.log(table.params[g])
        p2, p1, p0 = np.polyfit(x, table.loss[g], 2)
        vertex = -p1 / (2 * p2) if p2 > 0 else math.nan
        if not (p2 > 0 and x.min() <= vertex <= x.max()):
            out.skipped.append(f"C={budget:.3g}: loss has no minimum inside the sizes tried")
            continue
        n_opt = float(math.exp(vertex))
        out.profiles.append(IsoflopProfile(budget, n_opt, budget / (6 * n_opt),
                                           float(p0 + p1 * vertex + p2 * vertex ** 2), sizes))
    if len(out.profiles) >= 2:
        lc = np.log([p.flops for p in out.profiles])
        out.a = float(np.polyfit(lc, np.log([p.n_opt for p in out.profiles]), 1)[0])
        out.b = float(np.polyfit(lc, np.log([p.d_opt for p in out.profiles]), 1)[0])
    return out


@dataclass
class Envelope:
    """L(C) = b·C^-a + L0 fitted to the lowest loss reached at each compute (paper App. B.2)."""

    a: float
    b: float
    L0: float
    points: int

    def loss(self, flops):
        return self.b * np.power(flops, -self.a) + self.L0


def pareto_front(flops: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the rows no cheaper row beats: the loss-versus-compute envelope's points."""
    keep, best = [], math.inf
    for i in np.argsort(flops, kind="stable"):
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


@single_threaded_blas
def fit_envelope(table: RunTable, delta: float = 1e-3) -> Envelope:
    """Huber fit on log loss, log-parametrised (log b', a, log L0) with C centred, from a small grid."""
    c, loss = table.compute(), table.loss
    front = pareto_front(c, loss)
    if len(front) <= 3:
        raise MiniCPMError(f"{len(front)} runs on the loss-vs-compute front; the envelope needs at least 4")
    lc = np.log(c[front])
    centre = float(lc.mean())
    x, logl = lc - centre, np.log(loss[front])

    def objective(theta):
        lb, a, l0 = theta
        value, (g1, g2) = _huber_of_log_sum([lb - a * x, np.full_like(x, l0)], logl, delta)
        return value, np.array([g1.sum(), -g1 @ x, g2.sum()])

    lo, hi = math.log(loss.min()), math.log(loss.max())
    bounds = [(lo - 20, hi + 7), (1e-4, 3.0), (lo - 20, hi)]
    best = None
    for a0 in (0.03, 0.1, 0.3):
        for frac in (0.3, 0.6, 0.9):
            theta0 = [math.log(max(loss[front].mean() * (1 - frac), 1e-12)), a0, math.log(loss[front].min() * frac)]
            res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
            if res.status != 1 and np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    if best is None or not bounds[1][0] * 1.0001 < best.x[1] < bounds[1][1] * 0.9999:
        raise MiniCPMError("the loss-vs-compute envelope fit did not converge")
    lb, a, l0 = best.x
    return Envelope(a=float(a), b=float(math.exp(lb + a * centre)), L0=float(math.exp(l0)), points=len(front))


# ------------------------------------------------------------------------------------------- batch-size law

@dataclass(frozen=True)
class BatchSizeLaw:
    """bs_tokens = a / L^b (paper App. A.2: a = 1.21e9, b = 6.24 with L the C4 loss)."""

    a: float
    b: float

    def batch_tokens(self, loss):
        return self.a / np.power(loss, self.b)


@dataclass
class BatchSizeFit:
    law: BatchSizeLaw
    boot: Bootstrap
    """Bootstrap refits (its `laws` are BatchSizeLaw objects)."""
    n_points: int
    rmse_log: float

    def intervals(self) -> dict[str, tuple[float, float]]:
        return {p: self.boot.interval([getattr(law, p) for law in self.boot.laws]) for p in ("a", "b")}


def _fit_log_linear(loss: np.ndarray, bs: np.ndarray) -> BatchSizeLaw:
    slope, intercept = np.polyfit(np.log(loss), np.log(bs), 1)
    return BatchSizeLaw(a=float(math.exp(intercept)), b=float(-slope))


def fit_batch_size_law(loss, batch_tokens, runs: Optional[Sequence[str]] = None, *, n_boot: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> BatchSizeFit:
    """Least squares of log bs = log a − b·log L over (loss, optimal batch) pairs, bootstrap over runs."""
    loss, bs = np.asarray(loss, dtype=float), np.asarray(batch_tokens, dtype=float)
    if len(loss) < 3:
        raise MiniCPMError(f"{len(loss)} (loss, batch_tokens) pairs; the batch-size law needs at least 3")
    if len(np.unique(loss)) < 2:
        raise MiniCPMError("every pair has the same loss; the batch-size law needs different losses")
    _check_bootstrap(n_boot, confidence)
    law = _fit_log_linear(loss, bs)
    rmse = float(np.sqrt(np.mean((np.log(law.batch_tokens(loss)) - np.log(bs)) ** 2)))
    groups = run_groups(list(runs) if runs is not None else [str(i) for i in range(len(loss))])
    rng = np.random.default_rng(seed)
    laws, failed = [], 0
    for _ in range(n_boot):
        idx = resample_groups(groups, rng)
        if len(np.unique(loss[idx])) < 2:
            failed += 1
            continue
        laws.append(_fit_log_linear(loss[idx], bs[idx]))
    if len(laws) < max(10, n_boot // 2):
        raise MiniCPMError(f"only {len(laws)} of {n_boot} bootstrap resamples had two different losses; add pairs")
    return BatchSizeFit(law, Bootstrap(laws, failed, confidence), len(loss), rmse)
