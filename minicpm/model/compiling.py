"""When torch.compile pays: the break-even rule that `parallel.compile: auto` (training: the decoder blocks) and
decoding (`compile="auto"`: the decode step) share. Compiling costs a one-off time and saves a fraction of every
step after it; it pays when the steps ahead save more than it costs. Each user keeps the costs measured for its own
work and device (train/distributed.py COMPILE_COSTS, infer/decoder.py DECODE_COMPILE_COSTS)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from minicpm.errors import MiniCPMError

COMPILE_SETTINGS = (True, False, "auto")


@dataclass(frozen=True)
class CompileCosts:
    """What compiling costs and saves for one kind of work (a training step, a decode step) on one kind of device."""

    compile_seconds: float
    """One-off: the first compiled step's extra time (tracing, code generation), seconds, the cache empty."""
    cached_compile_seconds: float
    """The same when the on-disk compile cache already holds the graphs (a resumed run: the run keeps its own)."""
    speedup: float
    """Eager step time over compiled step time."""
    eager_mfu: float | None = None
    """An eager step's share of the device's peak FLOP/s, where a step's time is estimated from its FLOPs before
    any has run (None where it is measured instead)."""


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str
    """One line for the run's start-up: what was chosen and why."""


def choose_compile(setting: bool | str, *, steps: int, step_seconds: float, costs: CompileCosts | None,
                   cached: bool = False, what: str = "parallel.compile") -> CompileChoice:
    """A compile setting resolved: true and false as set; auto compiles when `steps` steps, at the estimated eager
    step time, save more time compiled than compiling costs (where the costs are known). `what` names the setting
    in the reason and in the error for a bad one."""
    if setting not in COMPILE_SETTINGS or isinstance(setting, int) and not isinstance(setting, bool):
        raise MiniCPMError(f"{what}: expected true, false or auto, got {setting!r}")
    if setting != "auto":
        return CompileChoice(setting, f"{'compiled' if setting else 'eager'} ({what}: {str(setting).lower()})")
    if costs is None:
        return CompileChoice(False, "eager (auto: compiling is not measured to pay on this device in this dtype, "
                                    "or there is no C++ compiler for it)")
    saving = steps * step_seconds * (1.0 - 1.0 / costs.speedup)
    cost = costs.cached_compile_seconds if cached else costs.compile_seconds
    pays = saving > cost
    return CompileChoice(pays, f"{'compiled' if pays else 'eager'} (auto: {steps} steps x ~{step_seconds:.2g} s "
                               f"eager, {costs.speedup:g}x faster compiled, save ~{saving:.0f} s "
                               f"{'>' if pays else '<'} ~{cost:.0f} s to compile"
                               f"{' from the run' + chr(39) + 's cache' if cached else ''})")


def can_compile() -> bool:
    """Whether torch.compile's code generation has a C++ compiler to call (inductor builds its CPU kernels, and on
    CUDA Triton's launchers, with one): `auto` never picks a compile that would fail for want of it."""
    return any(shutil.which(name) for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))
