"""Parts 3 and 8 of `minicpm reproduce`: WSD against cosine at equal tokens (paper §4.3, Fig. 5/6), set up fairly,
and the multi-power law fitted on two of its schedules predicting a third.

Fair: one data mixture in every arm (no decay-stage switch), each schedule at its own learning rate (the best of a
small grid at tune_multiple·N, seed 0: cosine, and a stable run with a 10% exponential decay), every arm at every
seed (initialisation and data order). Per seed one stable run at the WSD learning rate, checkpointed at every run
length D and decay start; the decays (exponential with a half-life of a fifth of the decay, the paper's form, and
1-sqrt, Hägele et al. 2024) branch from it; Cosine(T = D) to 10% of the peak trains from scratch at each D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minicpm.laws.verdict import HOLDS, at_most, mean_interval
from minicpm.reproduce.findings import Finding, not_measured
from minicpm.reproduce.plan import Decay, Plan
from minicpm.reproduce.runs import (Run, batch, branch_run, final_loss, lr, non_embedding_params, shape, single_run,
                                    stable_run, write_json)
from minicpm.rundir import RunDir

MATCH_MARGIN = 0.01
"""nats/token: "matches" cosine means at most this much above it (about a quarter of a percent of the loss here)."""
TEN_PERCENT = Decay("exp", 0.1)
PAPER_SCHEDULES = ("§4.3, Fig. 5/6 (0.036B, 10N to 80N): the loss drops sharply in the decay and WSD with a 10% "
                   "exponential decay matches or beats Cosine(T = D) at every D; a decay of 10% of the tokens "
                   "suffices where 2.5% falls short. Hägele et al. 2024: a 20% 1-sqrt decay matches cosine.")
PAPER_CURVES = ("Luo et al. 2025 (the multi-power law): fitted on a constant and a cosine run, it predicts other "
                "schedules' curves within ~0.2% (25M-400M models).")
CURVE_ERROR = 0.01
"""The relative error of the predicted final loss the curve finding allows at this size."""
COSINE_FLOOR = 0.1


@dataclass
class Comparison:
    n: int
    steps: dict[float, int]
    """Steps of each run length D (a multiple of N)."""
    tuning: dict[str, dict[int, Run]] = field(default_factory=dict)
    """{cosine | wsd: {log2 lr: run}} at tune_multiple·N, seed 0."""
    stable: dict[int, Run] = field(default_factory=dict)
    cosine: dict[tuple[int, float], Run] = field(default_factory=dict)
    decays: dict[tuple[int, float, Decay], Run] = field(default_factory=dict)


def model(plan: Plan) -> list[str]:
    return shape(plan.schedule_width, plan.schedule_depth, base_width=plan.base_width)


def plan_comparison(plan: Plan) -> Comparison:
    n = non_embedding_params(plan.schedule_width, plan.schedule_depth)
    return Comparison(n, {m: round(m * n / plan.tokens_per_step) for m in (*plan.multiples, plan.tune_multiple,
                                                                          plan.branch_multiple)})


def _cosine(steps: int) -> list[str]:
    return ["schedule.kind=cosine", f"schedule.total_steps={steps}", f"schedule.floor={COSINE_FLOOR}",
            "schedule.cosine_period=null"]


def tuning_runs(plan: Plan, out: Path, recipe: Path, c: Comparison) -> list[Run]:
    steps = c.steps[plan.tune_multiple]
    common = [*model(plan), *batch(plan.tokens_per_step), "run.seed=0"]
    for k in plan.tune_log2_lrs:
        name = f"schedules/tune/cosine/lr{k}"
        c.tuning.setdefault("cosine", {})[k] = single_run(name, out / name, recipe, [*common, lr(k), *_cosine(steps)],
                                                          steps)
        name = f"schedules/tune/wsd/lr{k}"
        c.tuning.setdefault("wsd", {})[k] = single_run(name, out / name, recipe, [
            *common, lr(k), "schedule.kind=wsd", f"schedule.total_steps={steps}",
            f"schedule.decay_steps={max(1, round(TEN_PERCENT.fraction * steps))}", "schedule.decay=exp"], steps)
    return [r for by_lr in c.tuning.values() for r in by_lr.values()]


def tuned_log2_lr(c: Comparison) -> dict[str, int] | None:
    """The grid point of the lowest held-out loss for each schedule; None until every tuning run has finished."""
    chosen = {}
    for schedule, by_lr in c.tuning.items():
        losses = {k: final_loss(r.run_dir, r.final_step) for k, r in by_lr.items()}
        done = {k: v for k, v in losses.items() if v is not None and math.isfinite(v)}
        if not done:
            return None
        chosen[schedule] = min(done, key=done.get)
    return chosen


def comparison_runs(plan: Plan, out: Path, recipe: Path, c: Comparison, tuned: dict[str, int]) -> list[Run]:
    common = [*model(plan), *batch(plan.tokens_per_step), "run.log_every=1"]
    runs: list[Run] = []
    for seed in plan.seeds:
        stages: list[int] = [c.steps[plan.branch_multiple]]
        branches = []
        for m in plan.multiples:
            total = c.steps[m]
            stages.append(total)
            name = f"schedules/s{seed}/cosine-{m:g}N"
            c.cosine[seed, m] = single_run(name, out / name, recipe, [*common, f"run.seed={seed}",
                                                                      lr(tuned["cosine"]), *_cosine(total)], total)
            for decay in plan.decays:
                length = max(1, round(decay.fraction * total))
                stages.append(total - length)
                branches.append((m, decay, total - length, length))
        name = f"schedules/s{seed}/stable"
        stable = stable_run(name, out / name, recipe, [*common, f"run.seed={seed}", lr(tuned["wsd"])], stages)
        c.stable[seed] = stable
        runs.append(stable)
        runs += [c.cosine[seed, m] for m in plan.multiples]
        for m, decay, start, length in branches:
            name = f"schedules/s{seed}/{decay.name}-{m:g}N"
            c.decays[seed, m, decay] = branch_run(name, out / name, stable, start, length, decay.shape)
            runs.append(c.decays[seed, m, decay])
    return runs


def losses_by_schedule(plan: Plan, c: Comparison) -> dict[str, dict[float, list[float | None]]]:
    """{schedule: {D multiple: [loss per seed]}}: cosine, each decay, and constant (the stable run at D)."""
    table: dict[str, dict[float, list[float | None]]] = {"cosine": {}, "constant": {}}
    for m in plan.multiples:
        table["cosine"][m] = [final_loss(c.cosine[s, m].run_dir, c.steps[m]) for s in plan.seeds]
        table["constant"][m] = [final_loss(c.stable[s].run_dir, c.steps[m]) for s in plan.seeds]
        for decay in plan.decays:
            table.setdefault(decay.name, {})[m] = [
                final_loss(c.decays[s, m, decay].run_dir, c.decays[s, m, decay].final_step) for s in plan.seeds]
    return table


def _complete(values: list[float | None]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _per_seed_mean(table, schedule: str, multiples) -> list[float]:
    """Each seed's mean loss over the run lengths."""
    return [float(np.mean([table[schedule][m][i] for m in multiples])) for i in range(len(table[schedule][multiples[0]]))]


def schedules_finding(plan: Plan, c: Comparison, tuned: dict[str, int] | None, out: Path) -> Finding:
    title = "WSD vs cosine at equal tokens"
    if tuned is None or not c.stable:
        return not_measured(3, "schedules", title, PAPER_SCHEDULES, "the learning-rate tuning runs did not finish")
    table = losses_by_schedule(plan, c)
    missing = sorted(f"{s} at {m:g}N" for s, by_m in table.items() for m, v in by_m.items() if not _complete(v))
    multiples = [m for m in plan.multiples if all(_complete(table[s][m]) for s in table)]
    if not multiples:
        return not_measured(3, "schedules", title, PAPER_SCHEDULES, "no run length finished in every arm", missing)
    verdicts = []
    cosine = _per_seed_mean(table, "cosine", multiples)
    if TEN_PERCENT in plan.decays:
        verdicts.append(at_most(_per_seed_mean(table, TEN_PERCENT.name, multiples), cosine, margin=MATCH_MARGIN,
                                claim="WSD (10% exp decay) matches or beats Cosine(T = D): mean loss gap to cosine, "
                                      "nats"))
    short = Decay("exp", 0.025)
    if short in plan.decays and TEN_PERCENT in plan.decays:
        verdicts.append(at_most(_per_seed_mean(table, TEN_PERCENT.name, multiples),
                                _per_seed_mean(table, short.name, multiples),
                                claim="a 2.5% decay falls short of 10%: 10% minus 2.5% loss, nats"))
    for decay in plan.decays:
        if decay not in (TEN_PERCENT, short):
            verdicts.append(at_most(_per_seed_mean(table, decay.name, multiples), cosine, margin=MATCH_MARGIN,
                                    claim=f"WSD ({decay.fraction:.0%} {decay.shape} decay) matches or beats cosine: "
                                          f"mean loss gap to cosine, nats"))
    gaps = {}
    for schedule in table:
        gaps[schedule] = {}
        for m in multiples:
            diff = [a - b for a, b in zip(table[schedule][m], table["cosine"][m])]
            mean, interval = mean_interval(diff) if len(diff) > 1 else (diff[0], (diff[0], diff[0]))
            gaps[schedule][f"{m:g}N"] = {"mean_gap_to_cosine": mean, "interval": list(interval),
                                         "mean_loss": float(np.mean(table[schedule][m]))}
    finding = Finding(3, "schedules", title, PAPER_SCHEDULES, verdicts, missing=missing, numbers={
        "N": c.n, "multiples": list(multiples), "tokens": {f"{m:g}N": c.steps[m] * plan.tokens_per_step
                                                           for m in multiples},
        "learning_rates": {k: 2.0 ** v for k, v in tuned.items()}, "tuned_log2_lr": tuned,
        "seeds": list(plan.seeds), "losses": {s: {f"{m:g}N": v for m, v in by_m.items()} for s, by_m in table.items()},
        "gap_to_cosine": gaps})
    finding.figure = plot_schedules(plan, c, gaps, multiples, out / "schedules" / "schedules.png", out)
    finding.notes.append(f"learning rates from the grid 2^{list(plan.tune_log2_lrs)} at {plan.tune_multiple:g}N: "
                         f"cosine 2^{tuned['cosine']}, WSD 2^{tuned['wsd']}; one mixture in every arm.")
    if tuned["cosine"] in (plan.tune_log2_lrs[0], plan.tune_log2_lrs[-1]) or tuned["wsd"] in (
            plan.tune_log2_lrs[0], plan.tune_log2_lrs[-1]):
        finding.notes.append("a tuned learning rate lies at the grid's edge: the schedule may do better beyond it.")
    if TEN_PERCENT in plan.decays and verdicts[0].outcome != HOLDS:
        decay_steps = ", ".join(f"{max(1, round(TEN_PERCENT.fraction * c.steps[m]))} at {m:g}N" for m in multiples)
        best = min((s for s in gaps if s.startswith("wsd")),
                   key=lambda s: np.mean([g["mean_gap_to_cosine"] for g in gaps[s].values()]))
        finding.notes.append(
            f"why the 10% exponential decay may fall short here: it lasts {decay_steps} steps (the paper's lasts "
            f"thousands), and it keeps the LR below 0.3 of the peak for ~6% of the run where Cosine(T = D) to 10% "
            f"does for ~31%; the best decay here is {best} (mean gap to cosine "
            f"{np.mean([g['mean_gap_to_cosine'] for g in gaps[best].values()]):+.3f} nats), and the gap of the 10% "
            f"decay by D is " + ", ".join(f"{k} {v['mean_gap_to_cosine']:+.3f}" for k, v in
                                           gaps[TEN_PERCENT.name].items()) + ".")
    constant = gaps["constant"]
    finding.notes.append("constant LR (no decay) minus cosine: " + ", ".join(
        f"{k} {v['mean_gap_to_cosine']:+.3f}" for k, v in constant.items()) + " nats: the decay's drop.")
    return finding


def plot_schedules(plan: Plan, c: Comparison, gaps: dict, multiples, path: Path, out: Path) -> str:
    from minicpm.plots import figure, save_png

    fig = figure(11, 4.2, dpi=100)
    left, right = fig.subplots(1, 2)
    tokens = [c.steps[m] * plan.tokens_per_step for m in multiples]
    colour = {schedule: f"C{i}" for i, schedule in enumerate(gaps)}
    for schedule, by_m in gaps.items():
        mean = [by_m[f"{m:g}N"]["mean_gap_to_cosine"] for m in multiples]
        low = [by_m[f"{m:g}N"]["interval"][0] for m in multiples]
        high = [by_m[f"{m:g}N"]["interval"][1] for m in multiples]
        left.errorbar(tokens, mean, yerr=[np.subtract(mean, low), np.subtract(high, mean)], marker="o",
                      capsize=3, color=colour[schedule], label=schedule)
    left.axhline(0, color="k", lw=0.8)
    left.axhspan(-1, MATCH_MARGIN, color="g", alpha=0.06)
    left.set_ylim(min(-0.05, *[g["interval"][0] for by_m in gaps.values() for g in by_m.values()
                               if by_m is not gaps["constant"]]) - 0.01, None)
    left.set_xscale("log")
    left.set(xlabel="tokens D", ylabel="loss minus cosine's (nats)",
             title="held-out loss minus Cosine(T = D): mean, 90% interval")
    left.legend(fontsize=7)
    seed, m = plan.seeds[0], multiples[-1]
    tails = []
    for label, parts in [("cosine", [(c.cosine[seed, m].run_dir, None)]),
                         ("constant", [(c.stable[seed].run_dir, c.steps[m])])] + [
            (d.name, [(c.stable[seed].run_dir, c.decays[seed, m, d].final_step - _length(c, seed, m, d)),
                      (c.decays[seed, m, d].run_dir, None)]) for d in plan.decays]:
        steps, loss = smoothed(training_loss(parts))
        if len(steps):
            right.plot(np.asarray(steps) * plan.tokens_per_step, loss, color=colour.get(label, "k"), lw=1,
                       label=label)
            tails.append(loss[len(loss) // 2:])
    right.set(xlabel="tokens", ylabel="training loss (smoothed)", title=f"seed {seed}, D = {m:g}N")
    right.set_xlim(0.5 * c.steps[m] * plan.tokens_per_step, None)
    if tails:
        right.set_ylim(min(t.min() for t in tails) - 0.05, max(t.max() for t in tails) + 0.05)
    right.legend(fontsize=7)
    save_png(fig, path)
    return str(path.relative_to(out))


def _length(c: Comparison, seed: int, m: float, decay: Decay) -> int:
    return c.decays[seed, m, decay].job.kwargs["decay_steps"]


def training_loss(parts: list[tuple[Path, int | None]]) -> tuple[list[int], list[float], list[float]]:
    """(steps, lr, loss) of the training lines of a run made of parts: (run dir, last step taken from it)."""
    steps, lrs, losses = [], [], []
    for run_dir, until in parts:
        if not RunDir(run_dir).metrics_file.is_file():
            return [], [], []
        for r in RunDir(run_dir).read_metrics():
            if isinstance(r.get("loss"), (int, float)) and "lr" in r and (until is None or r["step"] <= until) \
                    and (not steps or r["step"] > steps[-1]):
                steps.append(int(r["step"]))
                lrs.append(float(r["lr"]))
                losses.append(float(r["loss"]))
    return steps, lrs, losses


def smoothed(curve, window: int = 16) -> tuple[np.ndarray, np.ndarray]:
    steps, _, loss = curve
    if len(loss) < window:
        return np.asarray(steps), np.asarray(loss)
    kernel = np.ones(window) / window
    return np.asarray(steps[window - 1:]), np.convolve(loss, kernel, mode="valid")


# ----------------------------------------------------------------------------- part 8: loss-curve prediction

def _curve(name: str, parts):
    from minicpm.laws.tables import Curve

    steps, lrs, losses = training_loss(parts)
    if not steps:
        return None
    s = np.asarray(steps)
    return Curve(name, s, np.asarray(lrs), s, np.asarray(losses))


def curves_finding(plan: Plan, c: Comparison, out: Path) -> Finding:
    """Per seed at the longest D: the multi-power law fitted on cosine and the 10% exponential decay predicts the
    curve of another decay; the error is that of the final loss (the mean over the last 10% of steps, where the
    schedules differ most)."""
    from minicpm.laws.curves import fit_curve_law, predict_loss
    from minicpm.laws.tables import lr_per_step

    title = "Loss-curve prediction (multi-power law)"
    target = next((d for d in plan.decays if d != TEN_PERCENT and d.fraction > 0.05), None)
    if not c.stable or target is None or TEN_PERCENT not in plan.decays:
        return not_measured(8, "curves", title, PAPER_CURVES, "part 3 did not run the schedules this part needs")
    m = plan.multiples[-1]
    errors, fits, series = [], {}, {}
    for seed in plan.seeds:
        def parts(decay: Decay):
            run = c.decays[seed, m, decay]
            return [(c.stable[seed].run_dir, run.final_step - _length(c, seed, m, decay)), (run.run_dir, None)]
        cos = _curve("cosine", [(c.cosine[seed, m].run_dir, None)])
        ten, held = _curve(TEN_PERCENT.name, parts(TEN_PERCENT)), _curve(target.name, parts(target))
        final = c.decays[seed, m, target].final_step
        if cos is None or ten is None or held is None or held.loss_steps[-1] != final:
            continue
        fit = fit_curve_law("mpl", [cos, ten], method="optimum")
        schedule = lr_per_step(held.lr_steps, held.lr, final)
        predicted = predict_loss("mpl", fit.params, schedule, held.loss_steps[held.loss_steps >= 1])
        observed = held.loss[held.loss_steps >= 1]
        tail = max(1, len(observed) // 10)
        error = abs(predicted[-tail:].mean() - observed[-tail:].mean()) / observed[-tail:].mean()
        errors.append(float(error))
        fits[str(seed)] = {"params": fit.params, "final_loss_rel_error": float(error),
                           "curve_rmse_rel": float(np.sqrt(np.mean((predicted / observed - 1) ** 2)))}
        series[seed] = (held.loss_steps[held.loss_steps >= 1], observed, predicted)
    if len(errors) < 2:
        return not_measured(8, "curves", title, PAPER_CURVES, "fewer than two seeds have the three curves")
    verdict = at_most(errors, [0.0] * len(errors), margin=CURVE_ERROR,
                      claim=f"fitted on cosine and {TEN_PERCENT.name} ({m:g}N), mpl predicts {target.name}'s final "
                            f"loss within {CURVE_ERROR:.0%}: relative error")
    finding = Finding(8, "curves", title, PAPER_CURVES, [verdict], numbers={
        "fitted_on": ["cosine", TEN_PERCENT.name], "predicted": target.name, "D": f"{m:g}N", "fits": fits})
    finding.notes.append(f"training loss per step ({plan.tokens_per_step} tokens): its noise, not the law, sets the "
                         f"curve error ({np.mean([f['curve_rmse_rel'] for f in fits.values()]):.2%} RMS); the final "
                         f"loss is the mean over the last 10% of steps. Fitted with method 'optimum' (Luo et al.'s "
                         f"own step sizes are set for their scale).")
    finding.figure = _plot_curve_prediction(series, target.name, out / "schedules" / "curve_prediction.png", out)
    return finding


def _plot_curve_prediction(series, name: str, path: Path, out: Path) -> str:
    from minicpm.plots import figure, save_png

    fig = figure(6.5, 4, dpi=100)
    ax = fig.subplots()
    for i, (seed, (steps, observed, predicted)) in enumerate(sorted(series.items())):
        s, o = smoothed((list(steps), None, list(observed)))
        ax.plot(s, o, color=f"C{i}", lw=1, label=f"seed {seed}: measured (smoothed)")
        ax.plot(steps, predicted, color=f"C{i}", ls="--", lw=1.2, label=f"seed {seed}: predicted")
    ax.set_xlim(0.4 * steps[-1], None)
    ax.set_ylim(None, float(np.percentile(predicted, 60)) + 0.3)
    ax.set(xlabel="step", ylabel="training loss", title=f"multi-power law predicting {name}")
    ax.legend(fontsize=7)
    save_png(fig, path)
    return str(path.relative_to(out))


def write_tuning(out: Path, tuned: dict[str, int] | None, c: Comparison) -> None:
    if tuned is not None:
        write_json(out / "schedules" / "tuned.json", {"log2_lr": tuned, "losses": {
            s: {str(k): final_loss(r.run_dir, r.final_step) for k, r in by_lr.items()} for s, by_lr in c.tuning.items()}})
