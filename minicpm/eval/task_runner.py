"""`minicpm eval tasks`: run lm-evaluation-harness tasks on a checkpoint, offline, and keep the results as JSON.

Task names resolve against the user's include paths, then the built-in task (stdlib_names, built once into the
cache directory), and only when a name is found in neither, lm-eval's own task index (MMLU, C-Eval, HellaSwag,
...; indexing those ~15k YAMLs takes 20-30 s on a small machine, so a run of local tasks skips it).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from minicpm.errors import MiniCPMError
from minicpm.eval.evaluators import EvalSetup, EvalTarget, register_evaluator
from minicpm.files import write_atomic

BUILTIN_QUESTIONS = 500


def _cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "minicpm"


def builtin_task_dir(n: int | None = None) -> Path:
    """The include path holding the built-in stdlib_names task, built on first use (a few seconds) under
    $XDG_CACHE_HOME/minicpm (the questions depend on the Python version, so its version names the folder)."""
    import sys

    from minicpm.eval.stdlib_task import TASK_NAME, build_stdlib_task

    n = n or BUILTIN_QUESTIONS
    folder = _cache_root() / "eval-tasks" / f"{TASK_NAME}-py{sys.version_info[0]}.{sys.version_info[1]}-n{n}"
    if not (folder / f"{TASK_NAME}.yaml").is_file():
        build_stdlib_task(folder, n=n)
    return folder


def _go_offline() -> None:
    # datasets reads these when it is first imported; a standard task whose data is not already in the HF cache
    # then fails at once instead of waiting on the network. A value the user set is kept.
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")


def _is_known(name: str, known: Sequence[str]) -> bool:
    if any(c in name for c in "*?["):
        return bool(fnmatch.filter(known, name))
    return name in known or name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _task_manager(tasks: Sequence[str], include_paths: list[Path], include_defaults: bool):
    """A TaskManager that knows every requested task; lm-eval's own index only when it is needed."""
    from lm_eval.tasks import TaskManager

    from minicpm.eval.stdlib_task import TASK_NAME

    paths = [str(p) for p in include_paths]
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    if TASK_NAME in tasks and TASK_NAME not in manager.all_tasks:
        paths.insert(0, str(builtin_task_dir()))  # the user's include paths may bring their own stdlib_names
        manager = TaskManager(include_path=paths, include_defaults=False)
    if include_defaults and not all(_is_known(t, manager.all_tasks) for t in tasks):
        manager = TaskManager(include_path=paths or None)
    for name in tasks:
        if not _is_known(name, manager.all_tasks):
            close = difflib.get_close_matches(name, manager.all_tasks, n=4, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise MiniCPMError(f"--tasks: unknown task {name!r}{hint} (add a folder of task YAMLs with --include-path)")
    return manager


def evaluate_tasks(checkpoint, tasks: Sequence[str] | str, *, include_path=None, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int = 8, device: str = "cpu",
                   output: str | Path | None = None, tokenizer=None, dtype: str | None = None,
                   include_defaults: bool = True) -> dict[str, Any]:
    """Run lm-eval tasks on a checkpoint directory (or an in-memory MiniCPM with `tokenizer`) and return lm-eval's
    results dict (JSON-ready: "results", "n-samples", "configs", "versions", "n-shot", "config", ...).

    tasks: names (or globs, or YAML paths), as a list or comma-separated; include_path: a folder of task YAMLs
    or a list of them; limit: examples per task (a fraction below 1); output: a JSON file written atomically;
    include_defaults: also look names up in lm-eval's own tasks (MMLU, HellaSwag, ...).
    Runs offline: local JSON/CSV tasks work, standard tasks need their data in the HF datasets cache.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    tasks = [t for t in tasks if t]
    if not tasks:
        raise MiniCPMError("--tasks: no task named")
    if num_fewshot is not None and num_fewshot < 0:
        raise MiniCPMError(f"--num-fewshot {num_fewshot}: must be 0 or more")
    if limit is not None and limit <= 0:
        raise MiniCPMError(f"--limit {limit}: must be positive")
    include_paths = [Path(p) for p in ([] if include_path is None else
                                       [include_path] if isinstance(include_path, (str, os.PathLike)) else include_path)]
    for path in include_paths:
        if not path.is_dir():
            raise MiniCPMError(f"--include-path {path}: not a directory")
    _go_offline()
    manager = _task_manager(tasks, include_paths, include_defaults)

    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from minicpm.eval.harness import MiniCPMLM

    model = MiniCPMLM(checkpoint, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, log_samples=False, bootstrap_iters=1000)
    results["config"]["model"] = "minicpm"
    results["config"]["model_args"] = {"pretrained": str(checkpoint) if model.checkpoint else "in-memory",
                                       "batch_size": batch_size, "device": device, "dtype": dtype}
    # round-trip through JSON so that what is returned is exactly what the file holds
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    if output is not None:
        write_atomic(output, text + "\n")
    return json.loads(text)


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's results table (task, version, filter, n-shot, metric, value), plus the groups' table if any."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


@dataclass
class TasksOptions:
    """Options of the lm-eval tasks evaluator (kind `lm_eval`)."""

    tasks: List[str] = field(default_factory=lambda: ["stdlib_names"])
    """lm-eval task names (built in: stdlib_names)."""
    limit: Optional[float] = 64
    """Examples per task (below 1: a fraction; null: all) — evaluations during training should stay short."""
    num_fewshot: Optional[int] = None
    """Few-shot examples (null: the task's own)."""
    include_path: Optional[List[str]] = None
    """Folders of task YAMLs."""
    batch_size: int = 8
    """Requests per forward pass."""


@register_evaluator("lm_eval", options=TasksOptions)
class TasksEvaluator:
    """lm-evaluation-harness tasks on the model being trained, as `<task>/<metric>` (e.g. stdlib_names/acc).
    One process only: under several, the harness would need the whole model on each."""

    aliases: dict[str, str] = {}

    def __init__(self, name: str, every: int, options: TasksOptions, setup: EvalSetup):
        if not setup.config.data.tokenizer:
            raise MiniCPMError(f"evaluators: {name} (lm_eval) needs data.tokenizer, the run's tokenizer")
        self.name, self.every, self.options = name, every, options
        self.tokenizer = setup.config.data.tokenizer

    def __call__(self, target: EvalTarget) -> dict[str, float]:
        if target.world_size > 1:
            raise MiniCPMError(f"evaluators: {self.name} (lm_eval) runs in single-process runs only; evaluate "
                               f"a checkpoint with `minicpm eval tasks` instead")
        limit = self.options.limit
        results = evaluate_tasks(target.model, self.options.tasks, include_path=self.options.include_path,
                                 num_fewshot=self.options.num_fewshot,
                                 limit=int(limit) if limit is not None and limit >= 1 else limit,
                                 batch_size=self.options.batch_size, device=str(target.device),
                                 tokenizer=self.tokenizer)
        out = {}
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if isinstance(value, (int, float)) and not metric.endswith("_stderr") and filter_name == "none":
                    out[f"{task}/{metric}"] = float(value)
        return out
