"""A synthetic scaling campaign for the planner tests: DIR/campaign.csv from a known L(N, D), and per size a stable
run and decay branches whose metrics.jsonl follow the multi-power law, each with a real config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minicpm.train.config import load_config, save_config
from minicpm.laws.curves import predict_loss
from minicpm.laws.chinchilla import ScalingLaw
from minicpm.laws.tables import trainer_lr_per_step
from minicpm.model.shapes import WidthRule
from minicpm.optim.schedule import wsd_schedule

TRUTH = ScalingLaw(E=2.5, A=30.0, B=20.0, alpha=0.4, beta=0.3)
WIDTHS = {32: 2, 48: 2, 64: 3, 96: 4, 128: 5}
"""width: depth of the campaign's sizes (the tiny preset's family: head size 16, d_ff 2.5·d, 2 query heads per KV)."""
FAMILY = WidthRule(head_dim=16, kv_groups=2)
LR, WARMUP, BATCH, SEQ = 0.01, 10, 256, 32
DECAY_AT = (100, 200, 300, 400)


def size_overrides(width: int, depth: int) -> list[str]:
    return FAMILY.overrides(width, depth)


def run_config(out: Path, width: int, depth: int, data: dict, *extra: str):
    code = data.get("code", "data/code")
    tokenizer = data.get("tokenizer")
    cfg = load_config(None, ["model.preset=tiny", *size_overrides(width, depth), f"data.stable={{{code}: 1.0}}",
                             *( [f"data.tokenizer={tokenizer}"] if tokenizer else []),
                             f"optim.lr={LR}", f"batch.tokens_per_step={BATCH}", f"batch.seq_len={SEQ}",
                             "batch.micro_batch_size=4", f"schedule.warmup_steps={WARMUP}", *extra])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return cfg


def mpl_of(n: float) -> dict:
    """Multi-power law parameters of a size (in this campaign's LR units): its floor follows the N term of TRUTH."""
    return {"L0": TRUTH.E + TRUTH.A * n ** -TRUTH.alpha, "A": 0.8, "alpha": 0.45, "B": 30.0, "C": 0.5, "beta": 0.6,
            "gamma": 0.6}


def trainer_lr(schedule, total: int) -> np.ndarray:
    """The LR the trainer logs at steps 0..total (laws.tables.trainer_lr_per_step): schedule(s − 1) at step s."""
    return trainer_lr_per_step(LR, schedule, total)


def write_metrics(run: Path, lr: np.ndarray, steps: np.ndarray, loss: np.ndarray, eval_every: int = 50) -> None:
    lines = [{"step": int(s), "tokens": int(s) * BATCH, "lr": float(lr[s]), "loss": float(v)}
             for s, v in zip(steps, loss)]
    evals = [{"step": int(s), "tokens": int(s) * BATCH, "eval_loss": float(v) * 1.01}
             for s, v in zip(steps, loss) if s % eval_every == 0 or s == steps[-1]]
    records = sorted(lines + evals, key=lambda r: (r["step"], "eval_loss" in r))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_campaign(root: Path, data: dict | None = None, *, noise: float = 1e-3, seed: int = 0,
                  widths: dict = WIDTHS) -> Path:
    from minicpm.train.config import model_config

    data = data or {}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["size,N,D,flops,loss,bpb,run"]
    total = max(DECAY_AT) * 11 // 10
    for width, depth in widths.items():
        size = f"w{width}"
        stable = root / "runs" / size / "stable"
        cfg = run_config(stable, width, depth, data, "schedule.kind=constant", f"schedule.total_steps={max(DECAY_AT)}")
        n = model_config(cfg).non_embedding_params()
        law = mpl_of(n)
        constant = trainer_lr(lambda s: min(1.0, (s + 1) / WARMUP), total)
        steps = np.arange(5, max(DECAY_AT) + 1, 5)
        write_metrics(stable, constant, steps,
                      predict_loss("mpl", law, constant, steps) * (1 + rng.normal(0, noise, len(steps))))
        for at in DECAY_AT:
            decay = at // 10
            branch = root / "runs" / size / f"decay{at}"
            run_config(branch, width, depth, data, "schedule.kind=wsd", f"schedule.total_steps={at + decay}",
                       f"schedule.decay_steps={decay}",
                       f"run.init_from={stable / 'checkpoints' / f'step_{at:08d}'}")
            lr = trainer_lr(lambda s: wsd_schedule(s, warmup_steps=WARMUP, decay_start=at, decay_steps=decay,
                                                   decay="exp", half_life=decay / 5), at + decay)
            bsteps = np.arange(at + 1, at + decay + 1)
            write_metrics(branch, lr, bsteps,
                          predict_loss("mpl", law, lr, bsteps) * (1 + rng.normal(0, noise, len(bsteps))),
                          eval_every=10**9)
            d = (at + decay) * BATCH
            loss = float(TRUTH.loss(n, d)) * (1 + rng.normal(0, noise))
            rows.append(f"{size},{n},{d},{6 * n * d},{loss:.6f},{loss / 3:.6f},{size}/decay{at}")  # as written by a campaign
    (root / "campaign.csv").write_text("\n".join(rows) + "\n")
    return root


def write_windtunnel(root: Path, *, batch_tokens_at_3: float = 512.0, lr: float = 0.02) -> Path:
    """A wind tunnel: bs = a / L^2 giving batch_tokens_at_3 at L = 3, and a μP optimum lr at the widest width."""
    (root / "batch").mkdir(parents=True, exist_ok=True)
    (root / "lr").mkdir(parents=True, exist_ok=True)
    (root / "batch/result.json").write_text(json.dumps({"a": batch_tokens_at_3 * 9.0, "b": 2.0, "points": []}))
    (root / "lr/result.json").write_text(json.dumps({"optima": {"mup": [
        {"width": 64, "lr": lr / 2, "loss": 3.1, "shift": 0}, {"width": 128, "lr": lr, "loss": 3.0, "shift": 1}]}}))
    return root


def budget_for(n_target: float, law: ScalingLaw = TRUTH) -> float:
    """The FLOPs whose compute-optimal N under `law` is n_target."""
    return 6.0 * (n_target / law.K) ** ((law.alpha + law.beta) / law.beta)
