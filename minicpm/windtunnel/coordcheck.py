"""`minicpm coordcheck`: the μP coordinate check (Yang et al. 2021; microsoft/mup's coord_check) over widths × steps,
μP against standard parametrisation, with a plot and a verdict per parametrisation.

The measurements are minicpm.optim.mup.coord_check (mean |x| per module after t AdamW steps on one fixed batch).
Here they are grouped by layer kind (embedding; attention and MLP branch outputs, the residual stream, each the
mean over layers; logits) and judged as tests/test_mup.py does: a parametrisation is width-stable when the residual
stream at every step and the logits after the last step vary across widths by less than `tolerance`× (at
initialisation, and in the first steps' transient, the logits may shrink with width: microsoft/mup's README names
that exception).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.model.shapes import WidthRule
from minicpm.plots import figure, save_png

KINDS = ("embedding", "attn", "mlp", "residual", "logits")
PARAMETRISATIONS = {"mup": "μP", "sp": "SP"}


def by_kind(scales: dict[str, list[float]]) -> dict[str, list[float]]:
    """One width's per-module scales as per-kind scales (the mean over layers of each kind)."""
    groups: dict[str, list[list[float]]] = {kind: [] for kind in KINDS}
    for module, values in scales.items():
        parts = module.split(".")
        if module in ("embedding", "logits"):
            groups[module].append(values)
        elif parts[0] == "layers" and len(parts) == 3:
            groups[parts[2]].append(values)
        elif parts[0] == "layers":
            groups["residual"].append(values)
    return {kind: [sum(v) / len(v) for v in zip(*rows)] for kind, rows in groups.items() if rows}


@dataclass
class Verdict:
    parametrisation: str
    stable: bool
    worst: str
    spread: float

    def line(self) -> str:
        name = PARAMETRISATIONS[self.parametrisation]
        state = "width-stable" if self.stable else "NOT width-stable"
        return f"{name}: {state} (largest spread across widths: {self.worst}, {self.spread:.2f}x)"


def spread(kinds: dict[int, dict[str, list[float]]], kind: str, t: int) -> float:
    values = [per_width[kind][t] for per_width in kinds.values()]
    return max(values) / min(values)


def judge(parametrisation: str, kinds: dict[int, dict[str, list[float]]], steps: int, tolerance: float) -> Verdict:
    checks = [(f"residual at t={t}", spread(kinds, "residual", t)) for t in range(steps + 1)]
    checks.append((f"logits at t={steps}", spread(kinds, "logits", steps)))
    worst, value = max(checks, key=lambda c: c[1])
    return Verdict(parametrisation, value < tolerance, worst, value)


@dataclass
class CoordCheckResult:
    widths: list[int]
    steps: int
    kinds: dict[str, dict[int, dict[str, list[float]]]]
    verdicts: dict[str, Verdict]
    written: list[Path]

    @property
    def mup_stable(self) -> bool:
        return self.verdicts["mup"].stable if "mup" in self.verdicts else True


def run_coordcheck(widths: Sequence[int], *, steps: int = 4, lr: float = 0.01, layers: int = 2, head_dim: int = 16,
                   seed: int = 0, tolerance: float = 2.0, parametrisations: Sequence[str] = ("mup", "sp"),
                   out: str | Path | None = None) -> CoordCheckResult:
    from minicpm.optim.mup import coord_check

    widths = WidthRule(head_dim=head_dim).widths_to_compare(widths)
    if steps < 1:
        raise MiniCPMError(f"--steps must be positive, got {steps}")
    if not lr > 0:
        raise MiniCPMError(f"--lr must be positive, got {lr}")
    if not tolerance > 1:
        raise MiniCPMError(f"--tolerance must be above 1 (a ratio of scales), got {tolerance}")
    kinds, verdicts = {}, {}
    for name in parametrisations:
        result = coord_check(widths, steps=steps, mup=name == "mup", layers=layers, head_dim=head_dim, lr=lr,
                             seed=seed)
        kinds[name] = {width: by_kind(scales) for width, scales in result.items()}
        verdicts[name] = judge(name, kinds[name], steps, tolerance)
    written = []
    if out is not None:
        out = Path(out)
        written.append(write_atomic(out / "coordcheck.json", json.dumps({
            "widths": widths, "steps": steps, "lr": lr, "layers": layers, "tolerance": tolerance,
            "scales": {name: {str(w): k for w, k in per.items()} for name, per in kinds.items()},
            "verdicts": {name: {"stable": v.stable, "worst": v.worst, "spread": v.spread, "line": v.line()}
                         for name, v in verdicts.items()}}, indent=1) + "\n"))
        written.append(plot_coordcheck(kinds, widths, steps, verdicts, out / "coordcheck.png"))
    return CoordCheckResult(widths, steps, kinds, verdicts, written)


def plot_coordcheck(kinds, widths, steps, verdicts, path: Path) -> Path:
    """One row per parametrisation, one column per step shown (init, after one step, the last): mean |x| against
    width, log-log, a line per layer kind. Flat lines are what μP promises."""
    shown = sorted({0, 1, steps})
    fig = figure(4 * len(shown), 3.2 * len(kinds), dpi=90)
    axes = fig.subplots(len(kinds), len(shown), squeeze=False, sharex=True)
    for row, (name, per_width) in enumerate(kinds.items()):
        for col, t in enumerate(shown):
            ax = axes[row][col]
            for kind in KINDS:
                ax.plot(widths, [per_width[w][kind][t] for w in widths], marker="o", label=kind)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{PARAMETRISATIONS[name]}, t={t}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("mean |activation|")
            if row == len(kinds) - 1:
                ax.set_xlabel("width")
        axes[row][0].legend(fontsize=7)
    fig.suptitle("coordinate check: " + "; ".join(v.line() for v in verdicts.values()), fontsize=9)
    return save_png(fig, path)
