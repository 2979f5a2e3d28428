"""Part 6 of `minicpm reproduce`: what the decay does to the optimisation (paper §4.4). From each seed's stable run
(part 3) at branch_multiple·N: a decay (exponential, branch_fraction of that point's steps) and, beside it, the same
steps at the constant learning rate, both logging the decay dynamics every step (run.dynamics: gradient norm,
consecutive-gradient cosine, update norm, curvature along the update). Per seed, the decay's second half is set
against the same steps of the constant run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from minicpm.laws.verdict import at_most
from minicpm.reproduce.findings import Finding, not_measured
from minicpm.reproduce.plan import Plan
from minicpm.reproduce.runs import Run, branch_run, continue_run, final_loss
from minicpm.rundir import RunDir

PAPER_DYNAMICS = ("§4.4 (0.2B, exponential decay): in the decay the gradient norm falls, the cosine between "
                  "consecutive gradients turns mostly positive, and the curvature along the update rises ~10x.")
DYNAMICS = ("run.dynamics=true", "run.log_every=1")
CLAIMS = (("grad_norm", "the gradient norm falls: log(decay / constant)", -1),
          ("dynamics/grad_cos", "consecutive gradients agree more: cos(decay) - cos(constant)", 1),
          ("dynamics/curvature", "the curvature along the update rises: log(decay / constant)", 1))


def dynamics_runs(plan: Plan, out: Path, stables: dict[int, Run], branch_step: int) -> dict[int, tuple[Run, Run]]:
    steps = max(2, round(plan.branch_fraction * branch_step))
    pairs = {}
    for seed, stable in stables.items():
        name = f"dynamics/s{seed}"
        pairs[seed] = (branch_run(f"{name}/decay", out / name / "decay", stable, branch_step, steps, "exp", DYNAMICS),
                       continue_run(f"{name}/constant", out / name / "constant", stable, branch_step, steps, DYNAMICS))
    return pairs


def _second_half(run: Run, key: str, steps: int) -> list[float]:
    records = [r for r in RunDir(run.run_dir).read_metrics() if isinstance(r.get(key), (int, float))]
    return [float(r[key]) for r in records if r["step"] > run.final_step - steps // 2 and math.isfinite(r[key])]


def dynamics_finding(plan: Plan, pairs: dict[int, tuple[Run, Run]], out: Path) -> Finding:
    title = "Decay dynamics"
    done = {s: p for s, p in pairs.items() if all(final_loss(r.run_dir, r.final_step) is not None for r in p)}
    missing = [r.job.name for p in pairs.values() for r in p if final_loss(r.run_dir, r.final_step) is None]
    if len(done) < 2:
        return not_measured(6, "dynamics", title, PAPER_DYNAMICS, "fewer than two seeds finished both runs", missing)
    verdicts, numbers, means = [], {}, {}
    for key, claim, direction in CLAIMS:
        effects, pairs_of_means = [], []
        for seed, (decay, constant) in sorted(done.items()):
            steps = decay.job.kwargs["decay_steps"]
            a, b = _second_half(decay, key, steps), _second_half(constant, key, steps)
            if not a or not b:
                break
            pairs_of_means.append((float(np.mean(a)), float(np.mean(b))))
            if key == "dynamics/grad_cos":
                effects.append(float(np.mean(a) - np.mean(b)))
            else:
                effects.append(float(np.log(np.mean(a) / np.mean(b))))
        if len(effects) < 2:
            continue
        numbers[key] = effects
        means[key] = {"decay": [m[0] for m in pairs_of_means], "constant": [m[1] for m in pairs_of_means]}
        # the claim: effect·direction > 0, i.e. −direction·effect ≤ 0
        verdicts.append(at_most([-direction * e for e in effects], [0.0] * len(effects),
                                claim=f"{claim} (sign-adjusted, below 0 holds)"))
    if not verdicts:
        return not_measured(6, "dynamics", title, PAPER_DYNAMICS, "no run logged the decay dynamics", missing)
    finding = Finding(6, "dynamics", title, PAPER_DYNAMICS, verdicts, missing=missing,
                      numbers={"effects_per_seed": numbers, "second_half_means_per_seed": means})
    finding.figure = _plot(done, out / "dynamics" / "dynamics.png", out)
    if "dynamics/grad_cos" in means:
        cos = means["dynamics/grad_cos"]
        finding.notes.append(f"consecutive-gradient cosine in the decay's second half: {np.mean(cos['decay']):+.3f} "
                             f"(constant LR: {np.mean(cos['constant']):+.3f}), mean over seeds.")
    finding.notes.append("each effect compares the decay's second half with the same steps at the constant LR, "
                         "branched from the same checkpoint; the finding's verdict is that of the gradient norm, "
                         "the others follow.")
    return finding


def _plot(pairs: dict[int, tuple[Run, Run]], path: Path, out: Path) -> str:
    from minicpm.plots import figure, save_png

    fig = figure(12, 3.6, dpi=100)
    axes = fig.subplots(1, 4)
    keys = [("grad_norm", True), ("dynamics/grad_cos", False), ("dynamics/update_norm", True),
            ("dynamics/curvature", True)]
    for seed, (decay, constant) in sorted(pairs.items())[:1]:
        for run, color, label in ((decay, "C1", "decay"), (constant, "C0", "constant LR")):
            records = RunDir(run.run_dir).read_metrics()
            for ax, (key, log) in zip(axes, keys):
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if points:
                    steps, values = zip(*points)
                    window = max(1, len(values) // 12)
                    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                    ax.plot(steps[window - 1:], smooth, color=color, lw=1.2, label=label)
                ax.set_title(key.split("/")[-1], fontsize=9)
                if log:
                    ax.set_yscale("log")
        axes[0].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle("decay dynamics (seed 0, smoothed): decay vs the same steps at constant LR")
    save_png(fig, path)
    return str(path.relative_to(out))
