"""The multi-power law against Luo et al. (2025)'s own setting: their schedules, their published parameters and,
where given, their logged loss curves (thu-yao-01-luo/MultiPowerLaw, `loss_curve_repo/csv_{25,100,400}`).

Their protocol (`src/config.py`, `src/data_loader.py`): fit on cosine 24k, constant 24k and the two-step schedule
3e-4 -> 9e-5 at step 8000 (16k steps); test on constant and cosine 72k, WSD 20k->24k with exponential and with
linear decay to 3e-5, and the two-step schedules to 3e-5 and 1.8e-4. Warmup is linear 0 -> 3e-4 over 2160 steps
(numpy linspace), cosine ends at 3e-5. Loss points are their logged steps (every 128 steps from 2160).

    python benchmarks/multi_power_published.py                   # curves the law generates (published parameters)
    python benchmarks/multi_power_published.py --data DIR        # also their logged curves (DIR/csv_25 ...)
    python benchmarks/multi_power_published.py --noise 0.002     # the generated curves with 0.2% noise

Each fit runs by both methods of fit_curve_law: "optimum" (the objective's deepest optimum, our default) and
"luo" (their early-stopped AdamW, which reproduces their published parameters).

"test mean" is the mean over the test schedules of each one's mean relative error (their "Average Prede");
against the generated curves it is measured against the noise-free law.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from minicpm.laws.curves import FIT_METHODS, fit_curve_law, predict_loss
from minicpm.laws.tables import Curve

PEAK, END, WARMUP = 3e-4, 3e-5, 2160
# Luo et al. README "Best Parameters" (their src/config.py PARAMS), [L0, A, alpha, B, C, beta, gamma]
PUBLISHED = {"25": (3.04045406, 0.52468604, 0.50786857, 363.78751622, 2.06560812, 0.58279013, 0.64142257),
             "100": (2.6514477, 0.60115152, 0.45295811, 437.9464276, 2.13245612, 0.59785199, 0.65523644),
             "400": (2.37474466, 0.65421216, 0.42878731, 523.42464371, 2.02462735, 0.59350493, 0.63472457)}
THEIR_TEST_ERROR = {"25": 0.00110, "100": 0.00142, "400": 0.00168}
NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
TRAIN = ("cosine_24000", "constant_24000", "wsdcon_9")
TEST = ("constant_72000", "cosine_72000", "wsd_20000_24000", "wsdld_20000_24000", "wsdcon_3", "wsdcon_18")


def schedule(name: str) -> np.ndarray:
    """The LR at steps 0..total-1 exactly as their data loader builds it."""
    warm = np.linspace(0, PEAK, WARMUP)
    if name.startswith(("cosine", "constant")):
        total = int(name.split("_")[1])
        t = np.arange(total)[WARMUP:]
        rest = (END + 0.5 * (PEAK - END) * (1 + np.cos(np.pi * (t - WARMUP) / (total - WARMUP)))
                if name.startswith("cosine") else np.full(total - WARMUP, PEAK))
        return np.concatenate([warm, rest])
    if name.startswith("wsdcon"):
        lr_b = int(name.split("_")[1]) * 1e-5
        return np.concatenate([warm, np.full(8000 - WARMUP, PEAK), np.full(16000 - 8000, lr_b)])
    total, decay = 24000, 20000
    t = np.arange(total)[decay:]
    if name.startswith("wsdld"):
        tail = PEAK * (1 - (t - decay) / (total - decay)) + END * (t - decay) / (total - decay)
    else:
        tail = PEAK ** ((total - t) / (total - decay)) * END ** ((t - decay) / (total - decay))
    return np.concatenate([warm, np.full(decay - WARMUP, PEAK), tail])


def logged_steps(lr: np.ndarray) -> np.ndarray:
    return np.arange(WARMUP + 16, len(lr), 128)


def read_curve(folder: Path, name: str) -> Curve:
    rows = np.genfromtxt(folder / f"{name}.csv", delimiter=",", skip_header=1)
    lr = schedule(name)
    keep = rows[:, 0] < len(lr)  # their loader drops step 24000 (past the schedule's end)
    return Curve(name, np.arange(len(lr)), lr, rows[keep, 0].astype(int), rows[keep, 2])


def test_errors(params: dict, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    return {name: float(np.mean(np.abs(predict_loss("mpl", params, lr, steps) / loss - 1)))
            for name, (lr, steps, loss) in curves.items()}


def report(label: str, size: str, params: dict, tests: dict, truth: dict | None) -> None:
    errors = test_errors(params, tests)
    mean = np.mean(list(errors.values()))
    shown = " ".join(f"{e:.4%}" for e in errors.values())
    print(f"{size + 'M':>5} {label:<10} test mean {mean:.4%} (theirs {THEIR_TEST_ERROR[size]:.3%})  per test: {shown}")
    print(" " * 17 + "fitted " + " ".join(f"{n}={params[n]:.4g}" for n in NAMES)
          + (f"; C/C_true {params['C'] / truth['C']:.3f}, gamma-gamma_true {params['gamma'] - truth['gamma']:+.3f}"
             if truth else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="their loss_curve_repo folder (csv_25, csv_100, csv_400)")
    parser.add_argument("--noise", type=float, default=0.0, help="relative noise on the generated curves")
    args = parser.parse_args()
    for size, values in PUBLISHED.items():
        truth = dict(zip(NAMES, values))
        rng = np.random.default_rng(0)
        generated = {}
        for name in TRAIN + TEST:
            lr = schedule(name)
            steps = logged_steps(lr)
            clean = predict_loss("mpl", truth, lr, steps)
            generated[name] = (lr, steps, clean, clean * (1 + rng.normal(0, args.noise, len(steps))))
        for method in FIT_METHODS:
            fit = fit_curve_law("mpl", [Curve(n, np.arange(len(generated[n][0])), generated[n][0], generated[n][1],
                                              generated[n][3]) for n in TRAIN], max_points=1000, method=method)
            report(f"law/{method}", size, fit.params, {n: generated[n][:3] for n in TEST}, truth)
        if args.data:
            folder = args.data / f"csv_{size}"
            tests = {n: (c.lr, c.loss_steps, c.loss) for n in TEST for c in [read_curve(folder, n)]}
            for method in FIT_METHODS:
                fit = fit_curve_law("mpl", [read_curve(folder, n) for n in TRAIN], max_points=1000, method=method)
                report(f"data/{method}", size, fit.params, tests, None)
            report("published", size, truth, tests, None)


if __name__ == "__main__":
    main()
