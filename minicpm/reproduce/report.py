"""OUT/report.html of `minicpm reproduce`: the verdict table first, then each finding with the paper's claim, our
figure, every verdict with its interval, the notes, and the runs that did not finish. The figures are the PNGs
beside it (relative links), so OUT can be moved or archived whole."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from minicpm.files import write_atomic
from minicpm.reproduce.findings import Finding
from minicpm.reproduce.plan import Plan

COLOURS = {"holds": "#1a7f37", "does not hold": "#cf222e", "inconclusive": "#9a6700", "not measured": "#57606a"}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left;
font-size:14px}th{background:#f6f8fa}.v{font-weight:600}img{max-width:100%;border:1px solid #d0d7de}
section{margin:2.5em 0}blockquote{color:#57606a;border-left:4px solid #d0d7de;margin:0;padding:0 1em}
pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:12px}"""


def _outcome(outcome: str) -> str:
    return f'<span class="v" style="color:{COLOURS.get(outcome, "#000")}">{html.escape(outcome)}</span>'


def _interval(v) -> str:
    low, high = v.interval
    return f"{v.estimate:+.4g} [{low:+.4g}, {high:+.4g}]"


def verdict_rows(findings: Sequence[Finding]) -> list[tuple[str, str, str, str, str]]:
    """(part, claim, verdict, mean [interval], against) for every verdict: the table the report, the README and the
    closing note share."""
    rows = []
    for f in findings:
        if not f.verdicts:
            rows.append((str(f.part), f.title, f.outcome, "-", "-"))
        for v in f.verdicts:
            rows.append((str(f.part), v.claim, v.outcome, _interval(v), f"{v.threshold}, {v.seeds} {f.sample}"))
    return rows


def markdown_table(findings: Sequence[Finding]) -> str:
    lines = ["| part | claim | verdict | mean [90% interval] | against |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in verdict_rows(findings)]
    return "\n".join(lines)


def write_markdown(out: Path, plan: Plan, findings: Sequence[Finding]) -> Path:
    """OUT/results.md: the verdict table and each finding's claim, verdicts, notes and figure, in Markdown (the
    project's docs/results/reproduce.md is this file of a full run)."""
    lines = [f"## Verdicts ({plan.name} plan)", "", markdown_table(findings), ""]
    for f in findings:
        lines += [f"### {f.part}. {f.title}: {f.outcome}", "", f"Paper: {f.paper}", ""]
        if f.figure:
            lines += [f"![{f.title}]({f.figure})", ""]
        lines += [f"- {v.line()}" for v in f.verdicts] + [f"- {n}" for n in f.notes]
        if f.missing:
            lines.append(f"- not finished: {', '.join(f.missing)}")
        lines.append("")
    return write_atomic(out / "results.md", "\n".join(lines))


def write_report(out: Path, plan: Plan, findings: Sequence[Finding], failed: dict[str, str]) -> Path:
    parts = [f"<!doctype html><meta charset='utf-8'><title>minicpm reproduce: {plan.name}</title>"
             f"<style>{STYLE}</style><h1>The MiniCPM paper's findings at CPU scale ({html.escape(plan.name)} plan)</h1>"
             "<p>Each finding: the paper's claim, our figure, and verdicts computed from the runs — <b>holds</b> when "
             "the whole 90% interval over seeds lies on the claim's side of its threshold, <b>does not hold</b> when "
             "it lies on the other side, <b>inconclusive</b> when it straddles it.</p><table><tr><th>part</th>"
             "<th>claim</th><th>verdict</th><th>mean [90% interval]</th><th>against</th></tr>"]
    for part, claim, outcome, interval, against in verdict_rows(findings):
        parts.append(f"<tr><td>{part}</td><td>{html.escape(claim)}</td><td>{_outcome(outcome)}</td>"
                     f"<td>{html.escape(interval)}</td><td>{html.escape(against)}</td></tr>")
    parts.append("</table>")
    for f in findings:
        parts.append(f"<section><h2>{f.part}. {html.escape(f.title)}: {_outcome(f.outcome)}</h2>"
                     f"<blockquote>Paper: {html.escape(f.paper)}</blockquote>")
        if f.figure:
            parts.append(f"<p><img src='{html.escape(f.figure)}' alt='{html.escape(f.title)}'></p>")
        for v in f.verdicts:
            parts.append(f"<p>{_outcome(v.outcome)} — {html.escape(v.line())}</p>")
        if f.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in f.notes) + "</ul>")
        if f.missing:
            parts.append(f"<p>Not finished: {html.escape(', '.join(f.missing))}</p>")
        parts.append(f"<details><summary>numbers</summary><pre>{html.escape(json.dumps(f.numbers, indent=1))}"
                     f"</pre></details></section>")
    if failed:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>"
                                                          for k, v in sorted(failed.items())) + "</ul>")
    return write_atomic(out / "report.html", "\n".join(parts) + "\n")
