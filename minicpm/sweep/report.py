"""`minicpm report SWEEP_DIR`: a sweep drawn from its trials.csv (metric against each parameter, the best trials,
the failed ones with their one-line error), as sweep.png and a self-contained report.html.

trials.csv's columns are number, state, the parameters by dotted key, the metric, run_dir, error
(minicpm/experiments/sweep.py); the direction comes from the study when its journal is in the directory.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.plots import figure, log_axis, png_bytes

FIXED_COLUMNS = ("number", "state")
TAIL_COLUMNS = ("run_dir", "error")


def is_sweep_dir(path: str | Path) -> bool:
    from minicpm.sweep.sweep import TRIALS_CSV

    return (Path(path) / TRIALS_CSV).is_file()


@dataclass
class SweepTable:
    keys: list[str]
    metric: str
    direction: str
    rows: list[dict]

    def complete(self) -> list[dict]:
        done = [r for r in self.rows if r["state"] == "complete" and r["value"] is not None]
        return sorted(done, key=lambda r: r["value"], reverse=self.direction == "maximize")

    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["state"] == "failed"]


def read_sweep(path: str | Path) -> SweepTable:
    """The trials of a sweep directory, each parameter a float where it parses as one."""
    import csv

    from minicpm.sweep.sweep import TRIALS_CSV

    csv_path = Path(path) / TRIALS_CSV
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if (not header or tuple(header[:2]) != FIXED_COLUMNS or tuple(header[-2:]) != TAIL_COLUMNS
                or len(header) < 6):
            raise MiniCPMError(f"{csv_path}: not a sweep's trials.csv (expected the columns number, state, the "
                               f"parameters, the metric, run_dir, error)")
        keys, metric = header[2:-3], header[-3]
        rows = []
        for line in reader:
            record = dict(zip(header, line))
            value = _number(record[metric])
            rows.append({"number": int(record["number"]), "state": record["state"],
                         "params": {k: _number(record[k]) if _number(record[k]) is not None else record[k]
                                    for k in keys},
                         "value": value, "run_dir": record["run_dir"], "error": record["error"]})
    return SweepTable(keys, metric, _direction(Path(path)), rows)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _direction(path: Path) -> str:
    """The study's direction from its journal in the directory (minimize when there is none to read)."""
    from minicpm.sweep.sweep import STUDY_FILE

    if not (path / STUDY_FILE).is_file():
        return "minimize"
    try:
        import optuna

        from minicpm.sweep.sweep import open_storage

        storage = open_storage(path, None)
        summaries = optuna.get_all_study_summaries(storage)
        return "maximize" if summaries and summaries[0].direction.name == "MAXIMIZE" else "minimize"
    except Exception:  # an unreadable journal still leaves trials.csv to draw
        return "minimize"


def sweep_plot(table: SweepTable) -> bytes:
    """The metric against each parameter: one panel per parameter, the best trial starred, a failed trial an x at
    the panel's top."""
    keys = table.keys or ["number"]
    fig = figure(3.6 * len(keys) + 0.6, 3.6, dpi=100)
    axes = fig.subplots(1, len(keys), squeeze=False, sharey=True)[0]
    done = table.complete()
    for ax, key in zip(axes, keys):
        value_of = (lambda r: r["number"]) if key == "number" else (lambda r, k=key: r["params"].get(k))
        numeric = all(isinstance(value_of(r), (int, float)) for r in table.rows)
        positions = {}
        if not numeric:
            positions = {v: i for i, v in enumerate(sorted({str(value_of(r)) for r in table.rows}))}
            ax.set_xticks(list(positions.values()), list(positions), rotation=30, fontsize=7)
        x = (lambda r: value_of(r)) if numeric else (lambda r: positions[str(value_of(r))])
        if done:
            ax.scatter([x(r) for r in done], [r["value"] for r in done], s=20, label="complete")
            ax.scatter([x(done[0])], [done[0]["value"]], marker="*", s=160, color="red", zorder=3, label="best")
        failed = table.failed()
        if failed and done:
            top = max(r["value"] for r in done)
            ax.scatter([x(r) for r in failed], [top] * len(failed), marker="x", color="black", label="failed")
        values = [value_of(r) for r in table.rows]
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 10:
            log_axis(ax)
        ax.set_xlabel(key)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(table.metric)
    axes[0].legend(fontsize=7)
    return png_bytes(fig)


def _html_table(head, rows) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return ("<table><tr>" + cells("th", head) + "</tr>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</table>")


def summary_lines(table: SweepTable, best: int = 5) -> list[str]:
    counts: dict[str, int] = {}
    for row in table.rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines = [f"{len(table.rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f"; {table.metric}, {table.direction}"]
    for r in table.complete()[:best]:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"  trial {r['number']}: {table.metric} {r['value']:.4f} ({params})")
    for r in table.failed():
        lines.append(f"  failed: trial {r['number']}: {r['error'] or '(interrupted)'}")
    return lines


def write_sweep_report(path: str | Path, out: str | Path | None = None, *, best: int = 5) -> list[Path]:
    """sweep.png and report.html for a sweep directory (into `out`, default the sweep directory)."""
    path = Path(path)
    table = read_sweep(path)
    out = Path(out) if out else path
    out.mkdir(parents=True, exist_ok=True)
    png = sweep_plot(table)
    written = [write_atomic(out / "sweep.png", png)]
    ranked = table.complete()
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    best_rows = [(r["number"], f"{r['value']:.4f}", *(fmt(r["params"].get(k, "")) for k in table.keys), r["run_dir"])
                 for r in ranked[:best]]
    failed_rows = [(r["number"], *(fmt(r["params"].get(k, "")) for k in table.keys), r["error"] or "(interrupted)")
                   for r in table.failed()]
    title = f"sweep {path}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px}}img{{max-width:100%}}
</style></head><body><h1>{html.escape(title)}</h1>
<p>{html.escape(summary_lines(table, 0)[0])}</p>
<figure><img alt="sweep.png" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>
<h2>Best trials</h2>
{_html_table(("trial", table.metric, *table.keys, "run"), best_rows)}
<h2>Failed trials</h2>
{_html_table(("trial", *table.keys, "error"), failed_rows) if failed_rows else "<p>none</p>"}
</body></html>
"""
    written.append(write_atomic(out / "report.html", page))
    return written
