"""The built-in lm-eval task: name the standard-library function from its first lines (no downloads).

Each question shows the start of a public, documented function from the running Python's standard library (its
signature, docstring and first lines of body, the name itself masked as ``___``) and offers four names: the real
one and three names of other stdlib functions. Chance is 25%. A model trained on the stdlib corpus (the
quickstart's) has seen these functions, so the task checks that training and evaluation are wired up, not
general ability. The questions are a pure function of the stdlib's files, `n` and `seed`.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from importlib import resources
from pathlib import Path

import yaml

from minicpm.data.sources import stdlib_files
from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic

TASK_NAME = "stdlib_names"
SNIPPET_LINES = 8
MAX_LINE_CHARS = 100
MASK = "___"
_SKIPPED_DIRS = {"test", "tests", "idle_test"}  # test suites: synthetic names, not the library's functions


def _functions(path: Path, root: Path) -> list[dict]:
    """Public documented functions of one file: name, module and the masked first lines."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []  # a few stdlib files are deliberately not UTF-8 or not valid for this Python
    lines = source.splitlines()
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    found = []
    for node in ast.walk(tree):
        if (not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_")
                or len(node.name) < 3 or ast.get_docstring(node) is None):
            continue
        first = lines[node.lineno - 1:min(node.end_lineno, node.lineno - 1 + SNIPPET_LINES)]
        indent = len(first[0]) - len(first[0].lstrip())
        snippet = [line[indent:][:MAX_LINE_CHARS].rstrip() for line in first]
        # the name must not give itself away (recursive calls, "name(x) -> y" docstrings, a _name helper)
        code = "\n".join(snippet).replace(node.name, MASK)
        found.append({"name": node.name, "module": module, "code": code})
    return found


def stdlib_questions(n: int, seed: int = 0) -> list[dict]:
    """`n` questions {id, module, code, choices, label}, chosen and shuffled by `seed`."""
    files = [f for f in stdlib_files() if not _SKIPPED_DIRS.intersection(f.parts)]
    if not files:
        raise MiniCPMError("stdlib_names: found no standard-library .py files (sysconfig 'stdlib' path)")
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(f"{TASK_NAME}:{seed}")
    rng.shuffle(files)
    # parse files in a seeded order until there are enough functions (the whole stdlib takes ~10 s to parse)
    by_name: dict[str, dict] = {}
    wanted = 3 * n + 100
    for path in files:
        for function in _functions(path, root):
            by_name.setdefault(function["name"], function)  # one question per name: a name must be unambiguous
        if len(by_name) >= wanted:
            break
    if len(by_name) < n + 3:
        raise MiniCPMError(f"stdlib_names: n={n} is more than the {len(by_name) - 3} questions the stdlib offers")
    names = sorted(by_name)
    questions = []
    for index, name in enumerate(rng.sample(names, n)):
        distractors = rng.sample([other for other in names if other != name], 3)
        label = rng.randrange(4)
        choices = distractors[:label] + [name] + distractors[label:]
        function = by_name[name]
        questions.append({"id": index, "module": function["module"], "code": function["code"],
                          "choices": choices, "label": label})
    return questions


def build_stdlib_task(out_dir: str | Path, n: int = 500, seed: int = 0) -> Path:
    """Write stdlib_names.jsonl and the task's YAML (pointing at it) into `out_dir`; return `out_dir`, which is
    then an lm-eval include path (``--include-path``) that provides the task "stdlib_names"."""
    if not isinstance(n, int) or n <= 0:
        raise MiniCPMError(f"stdlib_names: n must be a positive integer, got {n!r}")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise MiniCPMError(f"{out_dir}: exists and is not a directory")
    questions = stdlib_questions(n, seed)
    data = out_dir / f"{TASK_NAME}.jsonl"
    write_atomic(data, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))
    config = yaml.safe_load(resources.files("minicpm.eval").joinpath("tasks", f"{TASK_NAME}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data)
    config["metadata"].update(questions=n, seed=seed, python=".".join(map(str, sys.version_info[:3])))
    write_atomic(out_dir / f"{TASK_NAME}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out_dir
