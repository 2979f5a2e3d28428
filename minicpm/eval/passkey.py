"""Passkey retrieval (`minicpm eval passkey`, evaluator kind `passkey`): the needle test the field uses for long
context (Landmark Attention's prompt, research/family.md section 2.3).

For every (length, depth) cell, `trials` prompts of at most `length` tokens hide a random key in [1, 50000] after
a fraction `depth` of the noise; the model decodes greedily and a trial counts when the first integer it writes is
the key. The grid of accuracies is written as JSON and as a heatmap PNG (length against depth).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from minicpm.data.synthetic_long import passkey_prompt
from minicpm.errors import MiniCPMError
from minicpm.eval.evaluators import EvalSetup, EvalTarget, register_evaluator

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_INTEGER = re.compile(r"\d+")


@dataclass
class PasskeyCase:
    length: int
    depth: float
    key: int
    ids: list[int]


def passkey_cases(encode: Callable[[str], list[int]], lengths: Sequence[int], depths: Sequence[float], *,
                  trials: int, seed: int = 0) -> list[PasskeyCase]:
    """The prompts of the grid: for each cell `trials` keys, each prompt the longest (most noise) that encodes to at
    most `length` tokens; the same seed gives the same prompts."""
    if not lengths or not depths or trials < 1:
        raise MiniCPMError(f"passkey: need lengths, depths and trials >= 1, got {list(lengths)}, {list(depths)}, "
                           f"{trials}")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise MiniCPMError(f"passkey: depth {depth} is not in [0, 1]")
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = rng.randint(1, 50000)
                lo, hi = 0, length
                while lo < hi:  # most noise sentences that fit
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if len(encode(passkey_prompt(key, mid, depth))) <= length else (lo, mid - 1)
                ids = encode(passkey_prompt(key, lo, depth))
                if len(ids) > length:
                    raise MiniCPMError(f"passkey: length {length} is too short for the prompt itself "
                                       f"({len(ids)} tokens with no noise)")
                cases.append(PasskeyCase(length, depth, key, ids))
    return cases


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation: with the KV cache for a plain MiniCPM, else by full forward passes (a sharded model's
    hooks must run)."""
    from minicpm.infer.generate import generate
    from minicpm.model.transformer import MiniCPM

    if isinstance(model, MiniCPM) and not type(model).__name__.startswith("FSDP"):
        return list(generate(model, ids, max_new_tokens=max_new_tokens, temperature=0))
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = []
    for _ in range(max_new_tokens):
        token = int(model(x)[0, -1].argmax())
        out.append(token)
        x = torch.cat([x, torch.tensor([[token]], device=device)], dim=1)
    return out


def first_integer(text: str) -> int | None:
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]
    """accuracy[i][j]: share of trials right at lengths[i], depths[j]."""
    trials: int
    samples: list[dict] = field(default_factory=list)

    @property
    def mean(self) -> float:
        cells = [a for row in self.accuracy for a in row]
        return sum(cells) / len(cells)

    def by_length(self) -> dict[int, float]:
        return {n: sum(row) / len(row) for n, row in zip(self.lengths, self.accuracy)}

    def as_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "trials": self.trials, "accuracy": self.accuracy,
                "mean_accuracy": self.mean, "accuracy_by_length": {str(k): v for k, v in self.by_length().items()},
                "samples": self.samples}


def passkey_accuracy(model: torch.nn.Module, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                     lengths: Sequence[int], depths: Sequence[float], *, trials: int = 4, seed: int = 0,
                     max_new_tokens: int = 8, autocast=None) -> PasskeyResult:
    """Greedy passkey accuracy on the grid; `autocast` an optional context manager factory for the forwards."""
    import contextlib

    cases = passkey_cases(encode, lengths, depths, trials=trials, seed=seed)
    right: dict[tuple[int, float], int] = {}
    samples = []
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            with (autocast or contextlib.nullcontext)():
                text = decode(greedy_tokens(model, case.ids, max_new_tokens))
            ok = first_integer(text) == case.key
            right[(case.length, case.depth)] = right.get((case.length, case.depth), 0) + ok
            samples.append({"length": case.length, "depth": case.depth, "tokens": len(case.ids), "key": case.key,
                            "output": text, "correct": ok})
    finally:
        model.train(was_training)
    accuracy = [[right.get((n, d), 0) / trials for d in depths] for n in lengths]
    return PasskeyResult(list(lengths), list(depths), accuracy, trials, samples)


def write_passkey_report(result: PasskeyResult, out: str | Path, *, title: str = "passkey retrieval") -> list[Path]:
    """OUT/passkey.json and OUT/passkey.png (accuracy heatmap, context length against needle depth)."""
    from minicpm.files import write_atomic
    from minicpm.plots import figure, save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_atomic(out / "passkey.json", json.dumps(result.as_dict(), indent=2) + "\n")
    fig = figure(1.2 + 0.9 * len(result.lengths), 1.2 + 0.6 * len(result.depths), dpi=120)
    ax = fig.subplots()
    grid = torch.tensor(result.accuracy).T.numpy()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    for i in range(len(result.lengths)):
        for j in range(len(result.depths)):
            ax.text(i, j, f"{result.accuracy[i][j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title}: mean {result.mean:.0%} ({result.trials} trials/cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    return [json_path, save_png(fig, out / "passkey.png")]


def evaluate_passkey_checkpoint(checkpoint: str | Path, *, lengths: Sequence[int], depths: Sequence[float],
                                trials: int, seed: int = 0, tokenizer: str | Path | None = None,
                                device: str = "cpu", dtype: str | None = "fp32") -> PasskeyResult:
    """`minicpm eval passkey`: the grid on a checkpoint, with the tokenizer beside it."""
    from minicpm.eval.token_loss import load_eval_model
    from minicpm.infer.tokenizer import find_tokenizer, load_codec
    from minicpm.rundir import resolve_weights

    codec = load_codec(find_tokenizer(resolve_weights(checkpoint), tokenizer))
    model = load_eval_model(checkpoint, device=device, dtype=dtype)
    return passkey_accuracy(model, codec.encode, codec.decode, lengths, depths, trials=trials, seed=seed)


@dataclass
class PasskeyOptions:
    """Options of the passkey evaluator."""

    lengths: Optional[List[int]] = None
    """Prompt lengths in tokens; null: batch.seq_len."""
    depths: List[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    """Needle depths, fractions of the noise before the needle."""
    trials: int = 2
    """Keys per (length, depth) cell."""
    seed: int = 0
    """Seed of the keys (the same prompts at every evaluation)."""
    tokenizer: Optional[str] = None
    """tokenizer.json; null: data.tokenizer."""


@register_evaluator("passkey", options=PasskeyOptions)
class PasskeyEvaluator:
    """Greedy passkey accuracy: {"accuracy", "accuracy@<length>"}. Every process runs every prompt (the same
    forwards, as sharded models need)."""

    def __init__(self, name: str, every: int, options: PasskeyOptions, setup: EvalSetup):
        from minicpm.infer.tokenizer import load_codec

        cfg = setup.config
        self.name, self.every, self.aliases = name, every, {}
        path = options.tokenizer or cfg.data.tokenizer
        if not path:
            raise MiniCPMError(f"evaluators.{name}: the passkey evaluator needs a tokenizer (data.tokenizer or its "
                               f"tokenizer option)")
        self.codec = load_codec(path)
        self.options = options
        self.lengths = options.lengths or [cfg.batch.seq_len]
        passkey_cases(self.codec.encode, self.lengths[:1], options.depths[:1], trials=1)  # bad options fail now

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        o = self.options
        result = passkey_accuracy(target.model, self.codec.encode, self.codec.decode, self.lengths, o.depths,
                                  trials=o.trials, seed=o.seed, autocast=getattr(target, "autocast", None))
        return {"accuracy": result.mean, **{f"accuracy@{n}": a for n, a in result.by_length().items()}}
