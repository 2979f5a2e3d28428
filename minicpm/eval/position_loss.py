"""Loss by token position (evaluator kind `loss_by_position`): the mean next-token loss in position buckets over
long held-out documents — perplexity against position, the curve that shows whether a model uses (or breaks on)
context beyond its training length.

Documents are whole: the first seq_len + 1 tokens of held-out documents at least that long, so that position p is
the p-th token of a document (packed windows would restart documents mid-window).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from minicpm.errors import MiniCPMError
from minicpm.eval.evaluators import EvalSetup, EvalTarget, register_evaluator


def long_documents(datasets: list[str], *, seq_len: int, documents: int, split: str = "val",
                   tokenizer_hash: str | None = None) -> torch.Tensor:
    """Up to `documents` rows (n, seq_len + 1): the starts of the longest-enough held-out documents, spread evenly
    over the datasets and over each split's qualifying documents."""
    from minicpm.data.shards import open_dataset

    rows = []
    per_set = max(documents // max(len(datasets), 1), 1)
    for path in datasets:
        ds = open_dataset(path, split)
        if tokenizer_hash is not None and ds.tokenizer_hash != tokenizer_hash:
            raise MiniCPMError(f"{path}: made with another tokenizer than the run's")
        long = np.flatnonzero(ds.document_lengths() >= seq_len + 1)
        take = long[np.linspace(0, len(long) - 1, min(per_set, len(long))).astype(int)] if len(long) else long
        rows += [ds.document(int(i))[:seq_len + 1].astype(np.int64) for i in take]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, seq_len + 1, dtype=torch.long)


@torch.no_grad()
def position_losses(model: torch.nn.Module, rows: torch.Tensor, *, chunk: int = 1024, autocast=None) -> torch.Tensor:
    """Summed loss (float64, shape seq_len) at each position over the rows, one row per forward; the head is applied
    `chunk` positions at a time so that the logits of a long row are never all in memory (a plain model), or through
    the model's forward (a wrapped one, whose hooks must run)."""
    device = next(model.parameters()).device
    total = torch.zeros(rows.shape[1] - 1, dtype=torch.float64, device=device)
    plain = hasattr(model, "hidden_states") and hasattr(model, "head_weight") and \
        not type(model).__name__.startswith("FSDP")
    for row in rows:
        ids = row[None].to(device)
        with (autocast or contextlib.nullcontext)():
            if plain:
                h = model.hidden_states(ids[:, :-1])[0]
                for start in range(0, h.shape[0], chunk):
                    logits = F.linear(h[start:start + chunk], model.head_weight).float()
                    total[start:start + chunk] += F.cross_entropy(logits, ids[0, 1 + start:1 + start + chunk],
                                                                  reduction="none").double()
            else:
                logits = model(ids[:, :-1])[0].float()
                total += F.cross_entropy(logits, ids[0, 1:], reduction="none").double()
    return total


def bucket_means(sums: torch.Tensor, count: int, buckets: int) -> dict[str, float]:
    """{"<first>-<last>/loss": mean loss over positions first..last} for `buckets` equal position ranges (1-based
    positions of the predicted tokens), and "loss" over all."""
    n = sums.shape[0]
    edges = np.linspace(0, n, buckets + 1).astype(int)
    out = {}
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            out[f"{a + 1}-{b}/loss"] = float(sums[a:b].sum()) / ((b - a) * count)
    out["loss"] = float(sums.sum()) / (n * count)
    return out


@dataclass
class PositionLossOptions:
    """Options of the loss-by-position evaluator."""

    datasets: Optional[List[str]] = None
    """Prepared datasets whose held-out documents are read; null: every dataset of both stages."""
    seq_len: Optional[int] = None
    """Positions per document; null: batch.seq_len."""
    documents: int = 16
    """Held-out documents (at least seq_len + 1 tokens long) per evaluation, shared between the datasets."""
    buckets: int = 8
    """Equal position ranges the losses are averaged over."""


@register_evaluator("loss_by_position", options=PositionLossOptions)
class PositionLoss:
    """{"<a>-<b>/loss" for each bucket, "loss"}; {} when no held-out document is long enough. Every process runs
    every document (the same forwards, as sharded models need)."""

    def __init__(self, name: str, every: int, options: PositionLossOptions, setup: EvalSetup):
        cfg = setup.config
        self.name, self.every, self.aliases, self.options = name, every, {}, options
        if options.buckets < 1 or options.documents < 1:
            raise MiniCPMError(f"evaluators.{name}: buckets and documents must be >= 1")
        dirs = options.datasets if options.datasets is not None else \
            list(dict.fromkeys([*cfg.data.stable, *(cfg.data.decay or {})]))
        seq_len = options.seq_len or cfg.batch.seq_len
        self.rows = long_documents([str(Path(d)) for d in dirs], seq_len=seq_len, documents=options.documents,
                                   tokenizer_hash=setup.tokenizer_hash)

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        if not len(self.rows):
            return {}
        sums = position_losses(target.model, self.rows, autocast=getattr(target, "autocast", None))
        return bucket_means(sums.cpu(), len(self.rows), self.options.buckets)


# ------------------------------------------------------------------ `minicpm eval positions`: checkpoints compared

@dataclass
class PositionCurve:
    label: str
    checkpoint: str
    buckets: dict[str, float]
    """{"<first>-<last>/loss": mean loss, ..., "loss": over all positions} (bucket_means)."""


@dataclass
class PositionReport:
    seq_len: int
    documents: int
    datasets: list[str]
    curves: list[PositionCurve]

    def as_dict(self) -> dict:
        return {"seq_len": self.seq_len, "documents": self.documents, "datasets": self.datasets,
                "curves": [{"label": c.label, "checkpoint": c.checkpoint, "loss_by_position": c.buckets}
                           for c in self.curves]}

    def table(self) -> str:
        ranges = position_ranges(self.curves[0].buckets)
        width = max(len(c.label) for c in self.curves)
        lines = [f"{'positions':<{width}}  " + "  ".join(f"{f'{a}-{b}':>9}" for _, a, b in ranges) + f"  {'all':>6}"]
        for c in self.curves:
            lines.append(f"{c.label:<{width}}  " + "  ".join(f"{c.buckets[key]:>9.3f}" for key, _, _ in ranges)
                         + f"  {c.buckets['loss']:>6.3f}")
        return "\n".join(lines)


def position_ranges(buckets: dict[str, float]) -> list[tuple[str, int, int]]:
    """(key, first, last) of each position bucket of bucket_means' output, in order."""
    return [(key, *map(int, key[:-len("/loss")].split("-"))) for key in buckets if key != "loss"]


def evaluate_position_checkpoints(checkpoints: list[str], datasets: list[str], *, seq_len: int, documents: int = 16,
                                  buckets: int = 8, labels: list[str] | None = None, tokenizer: str | None = None,
                                  device: str = "cpu", dtype: str | None = "fp32") -> PositionReport:
    """Loss by position of each checkpoint on the same held-out documents: the first seq_len + 1 tokens of
    `documents` held-out documents of `datasets` at least that long. The datasets must be tokenized with each
    checkpoint's tokenizer."""
    from minicpm.data.tokenizer import tokenizer_hash
    from minicpm.eval.token_loss import load_eval_model
    from minicpm.infer.tokenizer import find_tokenizer
    from minicpm.rundir import resolve_weights

    if not checkpoints or not datasets:
        raise MiniCPMError("eval positions: need at least one checkpoint and one --data directory")
    if labels is not None and len(labels) != len(checkpoints):
        raise MiniCPMError(f"--labels: {len(labels)} labels for {len(checkpoints)} checkpoints")
    if seq_len < 2 or buckets < 1 or documents < 1 or buckets > seq_len:
        raise MiniCPMError(f"eval positions: need seq_len >= 2, 1 <= buckets <= seq_len and documents >= 1, got "
                           f"{seq_len}, {buckets}, {documents}")
    for path in datasets:
        if not (Path(path) / "meta.json").is_file():
            raise MiniCPMError(f"--data {path}: not a prepared dataset (no meta.json)")
    curves, rows, rows_hash = [], None, None
    for i, checkpoint in enumerate(checkpoints):
        source = resolve_weights(checkpoint)
        hash_ = tokenizer_hash(find_tokenizer(source, tokenizer))
        if rows is None or hash_ != rows_hash:
            rows, rows_hash = long_documents(list(datasets), seq_len=seq_len, documents=documents,
                                             tokenizer_hash=hash_), hash_
        if not len(rows):
            raise MiniCPMError(f"--data {' '.join(datasets)}: no held-out document has {seq_len + 1} tokens "
                               f"(lower --seq-len)")
        model = load_eval_model(checkpoint, device=device, dtype=dtype)
        sums = position_losses(model, rows).cpu()
        curves.append(PositionCurve(labels[i] if labels else str(checkpoint), str(checkpoint),
                                    bucket_means(sums, len(rows), buckets)))
    return PositionReport(seq_len, len(rows), [str(d) for d in datasets], curves)


def write_position_report(report: PositionReport, out: str | Path, *, mark: int | None = None) -> list[Path]:
    """OUT/positions.json and OUT/positions.png (mean loss of each position bucket, one line per checkpoint; a
    dashed line at position `mark`, e.g. the length the model was trained at)."""
    import json

    from minicpm.files import write_atomic
    from minicpm.plots import figure, save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_atomic(out / "positions.json", json.dumps(report.as_dict(), indent=2) + "\n")
    fig = figure(6.4, 4.0, dpi=120)
    ax = fig.subplots()
    for curve in report.curves:
        ranges = position_ranges(curve.buckets)
        ax.plot([(a + b) / 2 for _, a, b in ranges], [curve.buckets[key] for key, _, _ in ranges], marker="o",
                label=curve.label)
    if mark:
        ax.axvline(mark, color="gray", linestyle="--", linewidth=1, label=f"position {mark}")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(f"loss by position: {report.documents} held-out documents of {report.seq_len + 1} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [json_path, save_png(fig, out / "positions.png")]
