"""trainer_state.json checked field by field before a resumed run trusts it.

The trainer writes {"step", "tokens", "data", "rng", "interval", "bad_steps", "world_size", "schedule"} (and the
lead's manifest may add "files"); check_trainer_state() makes every wrong type or range one MiniCPMError naming the
file and the field, instead of a TypeError deep inside random.setstate or IntervalStats(**...).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from minicpm.errors import MiniCPMError
from minicpm.checkpoints.integrity import check_manifest

MT19937_WORDS = 624  # Mersenne Twister state: 624 32-bit words and a position (Python adds it as a 625th)
_WORD = 1 << 32


def check_trainer_state(state: object, path: str | Path, *, total_steps: int | None = None) -> dict[str, Any]:
    """`state` (the parsed trainer_state.json at `path`) if every field has the type and range the trainer
    writes; total_steps, when given, bounds the step as well. Returns it as a dict."""
    where = str(path)

    def fail(field: str, what: str) -> None:
        raise MiniCPMError(f"{where}: {field} {what}")

    if not isinstance(state, Mapping):
        raise MiniCPMError(f"{where}: expected a JSON object, got {type(state).__name__}")
    for field in ("step", "tokens", "data", "rng", "interval", "bad_steps", "world_size"):
        if field not in state:
            raise MiniCPMError(f"{where}: no '{field}' field (not a trainer state minicpm wrote)")
    _integer(state["step"], "step", 0, fail)
    if total_steps is not None and state["step"] > total_steps:
        fail("step", f"{state['step']} is beyond schedule.total_steps {total_steps}")
    _integer(state["tokens"], "tokens", 0, fail)
    _integer(state["bad_steps"], "bad_steps", 0, fail)
    _integer(state["world_size"], "world_size", 1, fail)
    if not isinstance(state["data"], Mapping):
        fail("data", f"must be an object (the data sampler's state), got {_kind(state['data'])}")
    _check_interval(state["interval"], fail)
    _check_rng(state["rng"], fail)
    if "schedule" in state and not isinstance(state["schedule"], str):
        fail("schedule", f"must be a string, got {_kind(state['schedule'])}")
    if "files" in state:
        check_manifest(state["files"], f"{where}: files")
    return dict(state)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: object, field: str, minimum: int, fail, maximum: int | None = None) -> None:
    if not _is_int(value):
        fail(field, f"must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        fail(field, f"is {value}, expected {'>= ' + str(minimum) if maximum is None else f'{minimum}..{maximum}'}")


def _check_interval(interval: object, fail) -> None:
    """IntervalStats.state_dict(): {"sums": {name: finite number}, "steps": int, "skipped": int} and, for metrics
    some steps lack, "counts": {name: int} (checkpoints written before named metrics hold loss_sum and grad_norm_sum
    instead of sums)."""
    if not isinstance(interval, Mapping):
        fail("interval", f"must be an object, got {_kind(interval)}")
    legacy = "sums" not in interval
    allowed = ("loss_sum", "grad_norm_sum", "steps", "skipped") if legacy else ("sums", "steps", "skipped", "counts")
    for key in ("steps", "skipped", *(("loss_sum", "grad_norm_sum") if legacy else ())):
        if key not in interval:
            fail("interval", f"has no '{key}'")
    for key, value in interval.items():
        if key not in allowed:
            fail(f"interval.{key}", f"is not one of {', '.join(allowed)}")
        if key in ("steps", "skipped"):
            _integer(value, f"interval.{key}", 0, fail)
        elif key == "counts":
            if not isinstance(value, Mapping):
                fail("interval.counts", f"must be an object of step counts, got {_kind(value)}")
            for name, count in value.items():
                _integer(count, f"interval.counts.{name}", 0, fail)
        elif key == "sums":
            if not isinstance(value, Mapping):
                fail("interval.sums", f"must be an object of metric sums, got {_kind(value)}")
            for name, total in value.items():
                if not _finite(total):
                    fail(f"interval.sums.{name}", f"must be a finite number, got {total!r}")
        elif not _finite(value):
            fail(f"interval.{key}", f"must be a finite number, got {value!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rng(rng: object, fail) -> None:
    if not isinstance(rng, Mapping):
        fail("rng", f"must be an object, got {_kind(rng)}")
    for key in ("python", "numpy", "torch"):
        if key not in rng:
            fail("rng", f"has no '{key}' state")
    python = rng["python"]
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)
            and len(python[1]) == MT19937_WORDS + 1):
        fail("rng.python", "must be [version, 625 integers, gauss] as random.getstate() gives")
    _integer(python[0], "rng.python[0]", 1, fail, 3)
    _words(python[1][:-1], "rng.python[1]", fail)
    _integer(python[1][-1], "rng.python[1][624]", 0, fail, MT19937_WORDS)
    if python[2] is not None and not isinstance(python[2], float):
        fail("rng.python[2]", f"must be null or a number, got {python[2]!r}")
    numpy = rng["numpy"]
    if not (isinstance(numpy, list) and len(numpy) == 5 and numpy[0] == "MT19937" and isinstance(numpy[1], list)
            and len(numpy[1]) == MT19937_WORDS):
        fail("rng.numpy", "must be ['MT19937', 624 integers, pos, has_gauss, cached_gaussian]")
    _words(numpy[1], "rng.numpy[1]", fail)
    _integer(numpy[2], "rng.numpy[2]", 0, fail, MT19937_WORDS)
    _integer(numpy[3], "rng.numpy[3]", 0, fail, 1)
    if not isinstance(numpy[4], (int, float)) or isinstance(numpy[4], bool) or not math.isfinite(numpy[4]):
        fail("rng.numpy[4]", f"must be a finite number, got {numpy[4]!r}")
    expected = torch.get_rng_state().numel()
    if _base64_length(rng["torch"], "rng.torch", fail) != expected:
        fail("rng.torch", f"is not a CPU generator state of {expected} bytes")
    if "cuda" in rng:
        if not isinstance(rng["cuda"], list):
            fail("rng.cuda", f"must be a list, got {_kind(rng['cuda'])}")
        for i, s in enumerate(rng["cuda"]):
            _base64_length(s, f"rng.cuda[{i}]", fail)


def _words(values: list, field: str, fail) -> None:
    for i, v in enumerate(values):
        if not _is_int(v) or not 0 <= v < _WORD:
            fail(f"{field}[{i}]", f"must be an integer in [0, 2**32), got {v!r}")


def _base64_length(value: object, field: str, fail) -> int:
    if not isinstance(value, str):
        fail(field, f"must be a base64 string, got {_kind(value)}")
    try:
        return len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        fail(field, "is not valid base64")
