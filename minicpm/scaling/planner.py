"""`minicpm plan`: from a scaling campaign to a ready training config, predicted before any compute is spent.

From DIR/campaign.csv (size, N, D, flops, loss, bpb, run; written by `minicpm scaling campaign`):
1. L(N, D) = E + A/N^alpha + B/D^beta by approach 3 (fit.py), bootstrap over runs for the intervals;
2. the compute-optimal N for the budget (paper §4.5: N_opt = K·(C/6)^(beta/(alpha+beta))), snapped to a shape
   of the campaign's family (width a multiple of its head size, depth from its width-depth rule, else the paper's
   Table 8 rule), and D = C/(6·N) for that shape;
3. the batch size from the wind tunnel's bs = a/L^b (result.json of `windtunnel batch-size`), else the paper's
   bs = 1.21e9/L^6.24 tokens (App. A.2), at the predicted loss; the learning rate from the wind tunnel's μP optimum
   (result.json of `windtunnel lr-transfer`), else 0.01 (paper §3.3);
4. WSD with a 10% exponential decay (paper §4.3: 10% is enough, 2.5% falls short);
5. the predicted final loss with its bootstrap interval, and the predicted loss curve: a curve law fitted on the
   campaign's own curves of its largest size (its stable run and decay branches), run on the planned schedule in
   that size's steps, and moved by the constant that makes it end at L(N, D) — under L(N, D) two sizes' curves
   differ by A·(N1^-alpha − N2^-alpha) at every D, a constant.

Writes PLAN.yaml (a training config `minicpm train` runs as is; the plan in its leading comments) and, beside it,
PLAN.prediction.json (what `minicpm report RUN --prediction PLAN.yaml` draws).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object, write_atomic
from minicpm.model.shapes import Family, family_of, snap_shape
from minicpm.laws import BOOTSTRAP_RESAMPLES, CONFIDENCE

CAMPAIGN_FILE = "campaign.csv"
RUNS_DIR = "runs"
"""Where `minicpm scaling campaign` puts its runs; campaign.csv names each relative to it."""
CAMPAIGN_COLUMNS = ("size", "N", "D", "loss", "run")
PAPER_BATCH_LAW = (1.21e9, 6.24)
"""bs_tokens = a / L^b (paper App. A.2, L the C4 loss): 3.98M tokens at L = 2.5."""
PAPER_LR = 0.01
"""The μP base learning rate (paper §3.3), when no wind tunnel says otherwise."""
DECAY_FRACTION = 0.1
EVALUATIONS, CHECKPOINTS = 20, 10
"""About this many evaluations and checkpoints along the planned run."""
MAX_CURVE_SHIFT = 0.5
"""The predicted curve is dropped when moving it onto L(N, D) takes more than this fraction of the loss: its shape
then comes from an extrapolation far beyond the campaign's curves (a tiny campaign planned 40x longer: +230%)."""


# ------------------------------------------------------------------------------------------- the campaign

@dataclass
class CampaignRow:
    size: str
    n: float
    d: float
    loss: float
    run: Optional[Path]


def read_campaign(directory: str | Path) -> list[CampaignRow]:
    """The rows of DIR/campaign.csv, checked: one line naming the file, line and column at fault."""
    from minicpm.laws.tables import positive_cell, read_records

    directory = Path(directory)
    path = directory / CAMPAIGN_FILE
    if not directory.is_dir():
        raise MiniCPMError(f"--campaign {directory}: no such directory")
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such file (run `minicpm scaling campaign SPEC --out {directory}` first)")
    records = read_records(path)
    if not records:
        raise MiniCPMError(f"{path}: no rows")
    missing = [c for c in CAMPAIGN_COLUMNS if c not in records[0][1]]
    if missing:
        raise MiniCPMError(f"{path}: missing column {missing[0]!r} (need {', '.join(CAMPAIGN_COLUMNS)})")
    rows = []
    for where, rec in records:
        values = {}
        for col in ("N", "D", "loss"):
            value = positive_cell(rec.get(col), where, col)
            if math.isnan(value):
                raise MiniCPMError(f"{where}: column {col!r} is empty")
            values[col] = value
        run = (rec.get("run") or "").strip()
        rows.append(CampaignRow(str(rec.get("size") or values["N"]), values["N"], values["D"], values["loss"],
                                _resolve_run(directory, run) if run else None))
    for size in sorted({r.size for r in rows}):
        if sum(r.size == size for r in rows) < 2:
            raise MiniCPMError(f"{path}: size {size!r} has one point; each size needs two or more token counts")
    return rows


def _resolve_run(directory: Path, run: str) -> Path:
    """A run path as written: absolute, relative to the campaign's runs directory (what `minicpm scaling campaign`
    writes), relative to the campaign directory, or relative to where we are."""
    p = Path(run)
    if p.is_absolute():
        return p
    for candidate in (directory / RUNS_DIR / p, directory / p, p):
        if candidate.exists():
            return candidate
    return directory / RUNS_DIR / p


def _table(rows: list[CampaignRow], source: str):
    from minicpm.laws.tables import RunTable

    return RunTable(np.array([r.n for r in rows]), np.array([r.d for r in rows]), np.array([r.loss for r in rows]),
                    [str(r.run or f"{r.size}@{r.d:g}") for r in rows], source=source)


# ------------------------------------------------------------------------------------------- the wind tunnel

@dataclass
class TunnelResults:
    batch_law: Optional[tuple[float, float]] = None
    batch_source: str = "paper App. A.2: bs = 1.21e9 / L^6.24"
    lr: Optional[float] = None
    lr_source: str = "paper §3.3: 0.01"


def read_windtunnel(directory: str | Path | None) -> TunnelResults:
    """The batch-size law (a, b) and the μP optimum from the result.json files under DIR (DIR itself or its
    subdirectories); a missing one keeps the paper's value."""
    out = TunnelResults()
    if directory is None:
        return out
    directory = Path(directory)
    if not directory.is_dir():
        raise MiniCPMError(f"--windtunnel {directory}: no such directory")
    found = sorted([directory / "result.json", *directory.glob("*/result.json")])
    found = [p for p in found if p.is_file()]
    if not found:
        raise MiniCPMError(f"--windtunnel {directory}: no result.json (from windtunnel batch-size or lr-transfer)")
    for path in found:
        doc = read_json_object(path)
        if "a" in doc and "b" in doc:
            a, b = doc["a"], doc["b"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in (a, b)):
                raise MiniCPMError(f"{path}: a and b must be positive numbers, got {a!r}, {b!r}")
            out.batch_law, out.batch_source = (float(a), float(b)), f"{path}: bs = {a:.4g} / L^{b:.4g}"
        elif isinstance(doc.get("optima"), dict):
            optima = [o for o in doc["optima"].get("mup") or [] if isinstance(o, dict) and o.get("lr")]
            if optima:
                widest = max(optima, key=lambda o: o.get("width", 0))
                out.lr, out.lr_source = float(widest["lr"]), f"{path}: μP optimum at width {widest.get('width')}"
    return out


# ------------------------------------------------------------------------------------------- curves

def _records_curve(name: str, records: list[dict], loss_key: str = "loss"):
    from minicpm.laws.tables import Curve

    lr_pts, loss_pts = {}, {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int):
            continue
        if isinstance(r.get("lr"), (int, float)):
            lr_pts[step] = float(r["lr"])
        value = r.get(loss_key)
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            loss_pts[step] = float(value)
    if len(lr_pts) < 2 or not loss_pts:
        return None
    ls, ps = sorted(lr_pts), sorted(loss_pts)
    return Curve(name, np.array(ls), np.array([lr_pts[s] for s in ls]), np.array(ps),
                 np.array([loss_pts[s] for s in ps]))


def campaign_curves(runs: list[Path]) -> tuple[list, Optional[int]]:
    """The training-loss curves of one size's runs, each branch joined to its stable run's records up to the branch
    point (a branch's own records start there), the stable run once; and the size's batch in tokens."""
    from minicpm.rundir import RunDir, checkpoint_step, run_of

    curves, seen, batch = [], set(), None
    for path in runs:
        run = RunDir(path)
        if not run.metrics_file.is_file():
            continue
        config = run.read_config_dict()
        batch = batch or (config.get("batch") or {}).get("tokens_per_step")
        records = run.read_metrics()
        source = run.source_checkpoint()
        if source is not None:
            stable, at = run_of(source), checkpoint_step(source)
            if stable.metrics_file.is_file() and at is not None:
                before = [r for r in stable.read_metrics() if isinstance(r.get("step"), int) and r["step"] <= at]
                records = before + records
                if stable.path.resolve() not in seen:
                    seen.add(stable.path.resolve())
                    curve = _records_curve(stable.path.name, stable.read_metrics())
                    if curve is not None:
                        curves.append(curve)
        if run.path.resolve() in seen:
            continue
        seen.add(run.path.resolve())
        curve = _records_curve(run.path.name, records)
        if curve is not None:
            curves.append(curve)
    return curves, batch if isinstance(batch, int) else None


# ------------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    budget: float
    law: object
    n_opt: float
    model: object
    n: float
    d: float
    flops: float
    tokens_per_step: int
    total_steps: int
    warmup_steps: int
    decay_steps: int
    lr: float
    loss: float
    interval: tuple[float, float]
    confidence: float
    tunnel: TunnelResults
    family: Family
    batch_wanted: float
    curve: Optional[dict] = None
    curve_note: str = ""
    holdout: Optional[dict] = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        law, m = self.law, self.model
        lines = [
            f"L(N, D) = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}   "
            f"(K^2 = {law.K ** 2:.3g}, eta = {law.eta:.3f})",
            f"budget {self.budget:.3g} FLOPs: N_opt = {self.n_opt:.3g}; snapped to width {m.hidden_size}, depth "
            f"{m.num_hidden_layers}, {m.num_attention_heads} heads (depth rule from {self.family.rule_source}): "
            f"N = {self.n:.4g}",
            f"D = {self.d:.4g} tokens ({self.d / self.n:.1f} tokens/param), {self.total_steps} steps of "
            f"{self.tokens_per_step} tokens; {self.flops:.3g} FLOPs",
            f"batch {self.tokens_per_step} tokens (wanted {self.batch_wanted:.4g}; {self.tunnel.batch_source})",
            f"lr {self.lr:g} ({self.tunnel.lr_source}); WSD: warmup {self.warmup_steps}, exp decay over the last "
            f"{self.decay_steps} steps",
            f"predicted final loss {self.loss:.4f}, {self.confidence:.0%} interval [{self.interval[0]:.4f}, "
            f"{self.interval[1]:.4f}]",
        ]
        lines.append(f"predicted curve: {self.curve_note}")
        if self.holdout:
            h = self.holdout
            lines.append(f"holdout largest (N = {h['n']:.4g}, {h['rows']} rows): refitted without it, the law "
                         f"predicts it with mean |error| {h['mean_abs_rel_err']:.2%} (max {h['max_abs_rel_err']:.2%}); "
                         f"at D = {h['d_last']:.4g}: predicted {h['predicted_last']:.4f}, "
                         f"actual {h['actual_last']:.4f}")
        lines += self.notes
        return "\n".join(lines)


def _batch(wanted: float, seq_len: int, micro: int) -> tuple[int, int]:
    """tokens_per_step: the wanted batch rounded to whole micro-batches of sequences, and the micro-batch."""
    sequences = max(1, round(wanted / seq_len))
    if sequences >= micro:
        sequences = max(micro, round(sequences / micro) * micro)
    else:
        micro = sequences
    return sequences * seq_len, micro


def _holdout(table, delta: float) -> dict:
    from minicpm.laws.chinchilla import fit_chinchilla

    largest = table.params == table.params.max()
    if len(np.unique(table.params[~largest])) < 3:
        raise MiniCPMError("--holdout largest: without the largest size fewer than 3 sizes remain; the law needs 3")
    fit = fit_chinchilla(table.params[~largest], table.tokens[~largest], table.loss[~largest], delta=delta,
                         source="campaign without its largest size")
    predicted = fit.law.loss(table.params[largest], table.tokens[largest])
    rel = predicted / table.loss[largest] - 1.0
    last = int(np.argmax(table.tokens[largest]))
    return {"n": float(table.params.max()), "rows": int(largest.sum()), "mean_abs_rel_err": float(np.abs(rel).mean()),
            "max_abs_rel_err": float(np.abs(rel).max()), "d_last": float(table.tokens[largest][last]),
            "predicted_last": float(predicted[last]), "actual_last": float(table.loss[largest][last]),
            "law": fit.law.as_dict()}


def _predicted_curve(plan: Plan, curves: list, campaign_batch: int, schedule_lr: np.ndarray,
                     points: int = 200) -> dict:
    """The curve law fitted on the campaign curves, run on the planned schedule in the campaign size's steps, moved
    to end at L(N, D); the band is the L(N, D) interval widened by the curve fit's RMSE."""
    from minicpm.laws.curves import fit_curve_law, predict_loss

    # optimum, not luo: Luo et al.'s step sizes are set for their scale (~3 nats, peak LR ~3e-4), not a campaign's
    fit = fit_curve_law("mpl", curves, method="optimum")
    steps_c = int(round(plan.d / campaign_batch))
    if steps_c > 5_000_000:
        raise MiniCPMError(f"the plan is {steps_c} steps of the campaign's batch: too long to predict its curve")
    plan_steps = np.arange(len(schedule_lr))
    lr_c = np.interp(np.arange(steps_c + 1) * campaign_batch / plan.tokens_per_step, plan_steps, schedule_lr)
    steps = np.unique(np.linspace(1, steps_c, points).round().astype(int))
    raw = predict_loss("mpl", fit.params, lr_c, steps)
    shift = plan.loss - raw[-1]
    loss = raw + shift
    rmse = max(c.rmse_rel for c in fit.curves)
    lo = loss * (1 - 2 * rmse) + (plan.interval[0] - plan.loss)
    hi = loss * (1 + 2 * rmse) + (plan.interval[1] - plan.loss)
    return {"law": "mpl", "params": fit.params, "fitted_on": [c.name for c in curves],
            "fit_rmse_rel": rmse, "shift": float(shift), "tokens": (steps * campaign_batch).tolist(),
            "loss": loss.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}


def make_plan(budget: float, campaign: str | Path, *, windtunnel: str | Path | None = None,
              holdout: Optional[str] = None, bootstrap: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
              delta: float = 1e-3, batch_tokens: Optional[int] = None) -> tuple[Plan, object]:
    """The plan and the training config it writes (a TrainConfig). batch_tokens fixes the batch instead of a law."""
    from minicpm.train.config import load_config
    from minicpm.laws.chinchilla import bootstrap_chinchilla, fit_chinchilla
    from minicpm.laws.tables import run_model_config, trainer_lr_per_step

    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise MiniCPMError(f"--budget must be a positive number of FLOPs, got {budget!r}")
    if holdout not in (None, "largest"):
        raise MiniCPMError(f"--holdout {holdout!r}: the only holdout is 'largest'")
    campaign = Path(campaign)
    rows = read_campaign(campaign)
    table = _table(rows, str(campaign / CAMPAIGN_FILE))
    fit = fit_chinchilla(table.params, table.tokens, table.loss, delta=delta, source=table.source)
    boot = bootstrap_chinchilla(table, fit, n_boot=bootstrap, confidence=confidence, seed=seed)
    law = fit.law

    runs = [r.run for r in rows if r.run is not None and (r.run / "config.yaml").is_file()]
    if not runs:
        raise MiniCPMError(f"{campaign / CAMPAIGN_FILE}: no row's run directory has a config.yaml; the plan copies "
                           f"the campaign's data, sequence length and model family from one")
    models = {}
    for run in runs:
        models.setdefault(str(run), run_model_config(run))
    family = family_of(list(models.values()))
    template_run = max(runs, key=lambda r: models[str(r)].non_embedding_params())
    cfg = load_config(template_run / "config.yaml")

    n_opt = float(law.n_opt(budget))
    model = snap_shape(family, n_opt)
    n = float(model.non_embedding_params())
    d_wanted = budget / (6.0 * n)
    tunnel = read_windtunnel(windtunnel)
    a, b = tunnel.batch_law or PAPER_BATCH_LAW
    batch_wanted = float(a / float(law.loss(n, d_wanted)) ** b)
    if batch_tokens is not None:
        if batch_tokens < cfg.batch.seq_len:
            raise MiniCPMError(f"--batch-tokens {batch_tokens}: less than one sequence ({cfg.batch.seq_len} tokens)")
        batch_wanted, tunnel.batch_source = float(batch_tokens), "--batch-tokens"
    tokens_per_step, micro = _batch(batch_wanted, cfg.batch.seq_len, cfg.batch.micro_batch_size)
    total_steps = max(2, round(d_wanted / tokens_per_step))
    d = float(total_steps * tokens_per_step)
    decay_steps = max(1, round(DECAY_FRACTION * total_steps))
    warmup_tokens = cfg.schedule.warmup_steps * cfg.batch.tokens_per_step
    warmup_steps = int(min(max(1, round(warmup_tokens / tokens_per_step)), total_steps - decay_steps,
                           max(1, total_steps // 10)))
    lr = tunnel.lr or PAPER_LR
    loss = float(law.loss(n, d))
    interval = boot.interval([bl.loss(n, d) for bl in boot.laws])
    plan = Plan(budget, law, n_opt, model, n, d, 6.0 * n * d, tokens_per_step, total_steps, warmup_steps,
                decay_steps, lr, loss, interval, confidence, tunnel, family, batch_wanted)
    if tunnel.batch_law is None and batch_tokens is None:
        plan.notes.append(f"note: no wind-tunnel batch law (--windtunnel): the batch comes from the paper's "
                          f"bs = {a:.3g}/L^{b:g}, fitted to the C4 loss of the authors' models and tokenizer, applied "
                          f"to this campaign's loss per token (L = {float(law.loss(n, d_wanted)):.3f}); a law fitted "
                          f"on your own data (`minicpm windtunnel batch-size`) is preferred")
    if total_steps < 100:
        plan.notes.append(f"note: only {total_steps} steps: the batch ({tokens_per_step} tokens, from "
                          f"{tunnel.batch_source}) is large for this budget; a batch law of your own scale "
                          f"(--windtunnel) or --batch-tokens gives a usable schedule")

    from minicpm.train.config import ModelSection
    cfg.model = ModelSection(preset=None, **dataclasses.asdict(model))
    cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
    cfg.batch = dataclasses.replace(cfg.batch, tokens_per_step=tokens_per_step, micro_batch_size=micro)
    cfg.schedule = dataclasses.replace(cfg.schedule, kind="wsd", total_steps=total_steps, warmup_steps=warmup_steps,
                                       decay_steps=decay_steps, decay_start=None, decay="exp", half_life=None,
                                       floor=None, cosine_period=None)
    # a campaign run checkpoints every decay point and keeps them all; the planned run evaluates often enough for
    # `report --prediction` to draw its curve, and keeps a few checkpoints
    cfg.run = dataclasses.replace(cfg.run, out_dir=None, init_from=None, init_weights_from=None,
                                  eval_every=max(1, total_steps // EVALUATIONS),
                                  checkpoint_every=max(1, total_steps // CHECKPOINTS), keep_last=3)

    largest_runs = [r.run for r in rows if r.n == table.params.max() and r.run is not None]
    curves, campaign_batch = campaign_curves(largest_runs)
    if not curves or campaign_batch is None:
        plan.curve_note = "none (the largest size's runs have no metrics.jsonl with lr and loss)"
    else:
        schedule = cfg.schedule.resolve()
        schedule_lr = trainer_lr_per_step(lr, schedule, total_steps)
        try:
            curve = _predicted_curve(plan, curves, campaign_batch, schedule_lr)
        except MiniCPMError as e:
            plan.curve_note = f"none ({e})"
        else:
            if abs(curve["shift"]) > MAX_CURVE_SHIFT * plan.loss:
                plan.curve_note = (f"none (the curve law of the campaign's largest size, run on this plan, ends "
                                   f"{curve['shift']:+.3g} away from L(N, D): the plan lies too far beyond the "
                                   f"campaign's curves to draw its shape)")
            else:
                plan.curve = curve
                plan.curve_note = (f"multi-power law fitted on {len(curves)} curves of the largest campaign size, "
                                   f"shifted by {curve['shift']:+.4f} to end at L(N, D)")
    if holdout == "largest":
        plan.holdout = _holdout(table, delta)
    return plan, cfg


def prediction_json(plan: Plan) -> dict:
    return {"kind": "plan", "loss_key": "eval_loss", "budget": plan.budget, "params": plan.n, "tokens": plan.d,
            "final": {"tokens": plan.d, "loss": plan.loss, "interval": list(plan.interval),
                      "confidence": plan.confidence},
            "law": plan.law.as_dict(), "curve": plan.curve, "holdout": plan.holdout}


def write_plan(plan: Plan, cfg, out: str | Path) -> list[Path]:
    """PLAN.yaml (the config, the plan as leading comments) and PLAN.prediction.json beside it."""
    from minicpm.train.config import config_to_yaml, validate

    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        raise MiniCPMError(f"--out {out}: the plan is a training config; name it .yaml")
    # the run carries its prediction while it trains (train/prediction.py): the sidecar, as the plan is named
    cfg.run = dataclasses.replace(cfg.run, prediction=str(prediction_path(out)))
    validate(cfg)  # the checks `minicpm train` makes: a plan it would refuse is never written
    header = "".join(f"# {line}\n" for line in ["minicpm plan: train with `minicpm train THIS.yaml --out RUN`",
                                                *plan.text().splitlines()])
    written = [write_atomic(out, header + config_to_yaml(cfg))]
    written.append(write_atomic(prediction_path(out), json.dumps(prediction_json(plan), indent=1) + "\n"))
    return written


def prediction_path(plan_yaml: str | Path) -> Path:
    from minicpm.train.prediction import plan_prediction_path

    return plan_prediction_path(plan_yaml)
