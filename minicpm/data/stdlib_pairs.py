"""Demo preference pairs from the running Python's standard library (no downloads).

Prompt: a public function's `def` header followed by the opening of its docstring. Chosen: the docstring's true
summary line; rejected: the summary line of another function, drawn at random. A model that has read the stdlib
(the quickstart's) has some idea which summary fits which signature; DPO should sharpen it. The pairs are a pure
function of the stdlib's files, `n` and `seed`.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

from minicpm.data.sources import stdlib_files
from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic

MAX_HEADER_CHARS = 240
MIN_SUMMARY_CHARS = 12
MAX_SUMMARY_CHARS = 120
_SKIPPED_DIRS = {"test", "tests", "idle_test"}


def _documented(path: Path) -> list[tuple[str, str]]:
    """(header with the docstring opened, summary line) of each public documented function of one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or not node.body:
            continue
        summary = docstring.strip().splitlines()[0].strip()
        if not MIN_SUMMARY_CHARS <= len(summary) <= MAX_SUMMARY_CHARS:
            continue
        header_lines = lines[node.lineno - 1:node.body[0].lineno - 1]
        if not header_lines:
            continue
        indent = len(header_lines[0]) - len(header_lines[0].lstrip())
        header = "\n".join(line[indent:] for line in header_lines).rstrip()
        if len(header) > MAX_HEADER_CHARS or not header.endswith(":"):
            continue
        found.append((f'{header}\n    """', summary))
    return found


def stdlib_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs {prompt, chosen, rejected}: a function's header, its own summary line, another's."""
    files = [f for f in stdlib_files() if not _SKIPPED_DIRS.intersection(f.parts)]
    rng = random.Random(f"stdlib_pairs:{seed}")
    rng.shuffle(files)
    by_summary: dict[str, str] = {}  # one function per summary line: a rejected answer is never also right
    for path in files:
        for prompt, summary in _documented(path):
            by_summary.setdefault(summary, prompt)
        if len(by_summary) >= 2 * n + 50:
            break
    if len(by_summary) < n + 1:
        raise MiniCPMError(f"stdlib pairs: n={n} is more than the {len(by_summary) - 1} the stdlib offers")
    summaries = sorted(by_summary)
    out = []
    for summary in rng.sample(summaries, n):
        rejected = summary
        while rejected == summary:
            rejected = rng.choice(summaries)
        out.append({"prompt": by_summary[summary], "chosen": f'{summary}"""', "rejected": f'{rejected}"""'})
    return out


def write_stdlib_pairs(path: str | Path, n: int, seed: int = 0, *, as_messages: bool = False) -> Path:
    """The pairs as JSONL at `path` (written atomically); as_messages: each prompt as a user turn (for a chat
    template) instead of plain text."""
    pairs = stdlib_pairs(n, seed)
    if as_messages:
        pairs = [{"messages": [{"role": "user", "content": p.pop("prompt")}], **p} for p in pairs]
    return write_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
