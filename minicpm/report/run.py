"""Plots and a self-contained HTML report for one or more runs (a stable run and its decay branches overlay).

loss.png: train loss (lines) and held-out loss (markers) against tokens, with the learning rate on a second
axis; bpb.png: held-out bits per byte against tokens; router.png: an MoE's router (report_router.py). report.html
embeds them as base64 and tabulates each run.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.plots import figure, png_bytes
from minicpm.report.dynamics import dynamics_plot
from minicpm.report.router import router_plot, router_table
from minicpm.rundir import RunDir, checkpoint_step, run_of


@dataclass
class RunData:
    name: str
    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    config_text: str
    init_from: Path | None = None
    """The checkpoint a branch or continuation started from (run.init_from)."""


def load_run(path: str | Path) -> RunData:
    run = RunDir(path)
    records = run.read_metrics()
    if not records:
        raise MiniCPMError(f"{run.path}: no {run.metrics_file.name} records; is it a run directory?")
    return RunData(name=run.path.name or str(run.path), path=run.path,
                   train=[r for r in records if "loss" in r], evals=[r for r in records if "eval_loss" in r],
                   config_text=run.read_config_text(), init_from=run.source_checkpoint())


def attach_branches(runs: list[RunData]) -> None:
    """Start each branch's lines at its source run's point at the branch step, when the source is plotted too,
    so that a decay visibly leaves the stable curve."""
    by_dir = {run.path.resolve(): run for run in runs}
    for run in runs:
        source = by_dir.get(run_of(run.init_from).path.resolve()) if run.init_from else None
        if source is None or source is run:
            continue
        step = checkpoint_step(run.init_from)
        if step is None:
            continue
        for mine, theirs in ((run.train, source.train), (run.evals, source.evals)):
            at = [r for r in theirs if r["step"] == step]
            if at and (not mine or mine[0]["step"] > step):
                mine.insert(0, at[-1])


def loss_plot(runs: list[RunData]) -> bytes:
    """Train loss (lines) and eval loss (markers) vs tokens; the LR of each run dotted on the right axis."""
    fig = figure()
    ax = fig.add_subplot()
    lr_axis = ax.twinx()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    lows = []
    for run, color in zip(runs, colors):
        if run.train:
            tokens = [r["tokens"] for r in run.train]
            losses = [r["loss"] for r in run.train]
            ax.plot(tokens, losses, color=color, lw=1.3, label=f"{run.name} train")
            lr_axis.plot(tokens, [r["lr"] for r in run.train], color=color, lw=0.9, ls=":", alpha=0.8)
            lows.append(min(losses))
        if run.evals:
            ax.plot([r["tokens"] for r in run.evals], [r["eval_loss"] for r in run.evals], color=color, ls="--",
                    marker="o", ms=4, lw=0.9, label=f"{run.name} held-out")
            lows.append(min(r["eval_loss"] for r in run.evals))
    if lows:
        # the first steps' loss (~ln vocab) would squash the part worth seeing
        tail = sorted(r["loss"] for run in runs for r in run.train[len(run.train) // 10:]) or lows
        ax.set_ylim(min(lows) - 0.05 * abs(min(lows)), max(tail[int(0.9 * (len(tail) - 1))], min(lows) + 0.1))
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    lr_axis.set_ylabel("learning rate (dotted)")
    lr_axis.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("loss and learning rate against tokens")
    return png_bytes(fig)


def bpb_plot(runs: list[RunData]) -> bytes | None:
    """Held-out bits per byte vs tokens, one line per run and held-out set."""
    if not any(run.evals for run in runs):
        return None
    fig = figure()
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        if not run.evals:
            continue
        # eval/<evaluator>/<set>/bpb: one line per held-out set of each evaluator
        sets = sorted(k[len("eval/"):-len("/bpb")] for k in run.evals[-1] if k.startswith("eval/") and k.endswith("/bpb")
                      and k.count("/") == 3)
        for j, name in enumerate(sets):
            points = [(r["tokens"], r[f"eval/{name}/bpb"]) for r in run.evals if f"eval/{name}/bpb" in r]
            ax.plot(*zip(*points), color=f"C{i % 10}", ls=["-", "--", ":", "-."][j % 4], marker="o", ms=3,
                    label=f"{run.name}: {name}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("held-out bits per byte")
    return png_bytes(fig)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(runs: list[RunData]) -> str:
    head = ("run", "steps", "tokens", "final train loss", "final held-out loss", "held-out bits/byte",
            "tokens/s (median)", "MFU (median)")
    rows = []
    for run in runs:
        last_train = run.train[-1] if run.train else {}
        last_eval = run.evals[-1] if run.evals else {}
        speeds = sorted(r["tokens_per_s"] for r in run.train if "tokens_per_s" in r)
        mfus = sorted(r["mfu"] for r in run.train if "mfu" in r)
        rows.append((run.name, _fmt(last_train.get("step")), _fmt(last_train.get("tokens")),
                     _fmt(last_train.get("loss")), _fmt(last_eval.get("eval_loss")), _fmt(last_eval.get("eval_bpb")),
                     _fmt(speeds[len(speeds) // 2] if speeds else None, ",.0f"),
                     _fmt(mfus[len(mfus) // 2] if mfus else None, ".1%")))
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return ("<table><tr>" + cells("th", head) + "</tr>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</table>")


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None,
                 prediction: str | Path | None = None) -> list[Path]:
    """Write loss.png, bpb.png (when there are evaluations) and report.html; returns the paths written.

    prediction (a plan or a fit, minicpm/experiments/watch.py): also prediction.png, the first run against it, and
    the line saying how far its last eval is from it (which against_prediction returns for printing)."""
    runs = [load_run(p) for p in run_dirs]
    attach_branches(runs)
    out = Path(out_dir) if out_dir else runs[0].path
    images = {"loss.png": loss_plot(runs), "bpb.png": bpb_plot(runs), "router.png": router_plot(runs),
              "dynamics.png": dynamics_plot(runs)}
    verdict = ""
    if prediction is not None:
        from minicpm.scaling.prediction import against_prediction

        verdict, images["prediction.png"] = against_prediction(runs[0], prediction)
    written = []
    out.mkdir(parents=True, exist_ok=True)  # only once everything drawn: a refusal above leaves no directory
    for name, data in images.items():
        if data is not None:
            write_atomic(out / name, data)
            written.append(out / name)
    figures = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                      f"</figure>" for name, data in images.items() if data is not None)
    configs = "".join(f"<details><summary>{html.escape(run.name)}: config.yaml</summary>"
                      f"<pre>{html.escape(run.config_text)}</pre></details>" for run in runs if run.config_text)
    title = "MiniCPM runs: " + ", ".join(run.name for run in runs)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:8px}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Runs: {", ".join(html.escape(str(run.path)) for run in runs)}</p>
{f"<p><b>Against the prediction:</b> {html.escape(verdict)}</p>" if verdict else ""}
{_table(runs)}
{router_table(runs)}
{figures}
{configs}
</body></html>
"""
    write_atomic(out / "report.html", page)
    written.append(out / "report.html")
    return written
