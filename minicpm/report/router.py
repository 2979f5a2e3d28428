"""The MoE part of `minicpm report`: router health over training, from the metrics an MoE run logs (model/moe.py).

router.png, three panels against tokens, one colour per run: the expert load of the most and least loaded expert
of any layer (fraction of the top-k assignments; 1/E is perfect balance), the balance loss aux/load_balance
(top-k under perfect balance, E when one expert takes everything) and the mean router entropy (ln E at uniform
probabilities). The table gives each MoE run's last logged values per layer.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

LAYER_KEY = re.compile(r"moe/layer(\d+)/(load_max|load_min|router_entropy|load_expert(\d+))$")


def _is_moe(run) -> bool:
    return any("aux/load_balance" in r for r in run.train)


def _experts(record: dict[str, Any]) -> int:
    return len({m.group(3) for k in record if (m := LAYER_KEY.match(k)) and m.group(3) is not None})


def router_plot(runs) -> bytes | None:
    """router.png for the runs that logged router metrics, or None when none did."""
    from minicpm.plots import figure, png_bytes

    moe_runs = [(i, run) for i, run in enumerate(runs) if _is_moe(run)]
    if not moe_runs:
        return None
    fig = figure()
    load_ax, balance_ax, entropy_ax = fig.subplots(3, 1, sharex=True)
    experts = set()
    for i, run in moe_runs:
        color = f"C{i % 10}"
        rows = [r for r in run.train if "aux/load_balance" in r]
        tokens = [r["tokens"] for r in rows]
        load_ax.plot(tokens, [r.get("moe/load_max", math.nan) for r in rows], color=color, lw=1.2,
                     label=f"{run.name} max")
        load_ax.plot(tokens, [r.get("moe/load_min", math.nan) for r in rows], color=color, lw=1.2, ls="--",
                     label=f"{run.name} min")
        balance_ax.plot(tokens, [r["aux/load_balance"] for r in rows], color=color, lw=1.2, label=run.name)
        entropy_ax.plot(tokens, [r.get("moe/router_entropy", math.nan) for r in rows], color=color, lw=1.2,
                        label=run.name)
        experts.add(_experts(rows[-1]))
    if len(experts) == 1 and (e := experts.pop()):
        load_ax.axhline(1 / e, color="grey", lw=0.8, ls=":", label=f"balanced (1/{e})")
        entropy_ax.axhline(math.log(e), color="grey", lw=0.8, ls=":", label=f"uniform (ln {e})")
    load_ax.set_ylabel("expert load")
    load_ax.set_title("router: expert load (max and min over layers), balance loss, router entropy")
    balance_ax.set_ylabel("balance loss")
    entropy_ax.set_ylabel("entropy (nats)")
    entropy_ax.set_xlabel("tokens")
    for ax in (load_ax, balance_ax, entropy_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return png_bytes(fig)


def router_table(runs) -> str:
    """HTML: per MoE run and layer, the last logged expert load max/min and router entropy, and the aux losses."""
    head = ("run", "step", "layer", "load max", "load min", "router entropy", "balance loss", "router z-loss")
    rows = []
    for run in runs:
        last = next((r for r in reversed(run.train) if "aux/load_balance" in r), None)
        if last is None:
            continue
        layers = sorted({int(m.group(1)) for k in last if (m := LAYER_KEY.match(k))})
        for layer in layers:
            p = f"moe/layer{layer}/"
            rows.append((run.name, last["step"], layer, *(_number(last.get(p + k)) for k in
                                                           ("load_max", "load_min", "router_entropy")),
                         _number(last["aux/load_balance"]), _number(last.get("aux/router_z"))))
    if not rows:
        return ""
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return ("<h2>MoE router (last logged step)</h2><table><tr>" + cells("th", head) + "</tr>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</table>")


def _number(value) -> str:
    return "–" if value is None else f"{value:.4f}"
