"""Demo preference pairs from the running Python's standard library (no downloads).

Prompt: a public function's `def` header followed by the opening of its docstring. Chosen: the docstring's true
summary line. Rejected, by `kind`:
  truncated    the same summary cut after half its words and closed there: a complete answer is preferred to one
               that stops mid-sentence (the demo's default: a 1.3M-parameter model learns it and it carries over to
               functions it has not seen)
  mismatched   the summary line of another function, drawn at random: which summary fits which signature (measured
               on the quickstart's SFT model: held-out accuracy 0.525 before and after one epoch of DPO; too hard a
               preference for a model that small to generalise)
The pairs are a pure function of the stdlib's files, `n`, `seed` and `kind`.
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
KINDS = ("truncated", "mismatched")
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


def stdlib_pairs(n: int, seed: int = 0, kind: str = "truncated") -> list[dict]:
    """`n` pairs {prompt, chosen, rejected}: a function's header, its own summary line, and the summary cut short
    (truncated) or another function's (mismatched)."""
    if kind not in KINDS:
        raise MiniCPMError(f"stdlib pairs: kind {kind!r}: expected one of {', '.join(KINDS)}")
    files = [f for f in stdlib_files() if not _SKIPPED_DIRS.intersection(f.parts)]
    rng = random.Random(f"stdlib_pairs:{seed}")
    rng.shuffle(files)
    by_summary: dict[str, str] = {}  # one function per summary line: a rejected answer is never also right
    for path in files:
        for prompt, summary in _documented(path):
            by_summary.setdefault(summary, prompt)
        if len(by_summary) >= 2 * n + 50:
            break
    summaries = sorted(by_summary)
    if kind == "truncated":  # a summary needs 4 words or more for half of it to be a visibly cut answer
        summaries = [summary for summary in summaries if len(summary.split()) >= 4]
    if len(summaries) < n + 1:
        raise MiniCPMError(f"stdlib pairs: n={n} is more than the {len(summaries) - 1} the stdlib offers")
    out = []
    for summary in rng.sample(summaries, n):
        if kind == "truncated":
            words = summary.split()
            rejected = " ".join(words[:len(words) // 2])
        else:
            rejected = summary
            while rejected == summary:
                rejected = rng.choice(summaries)
        out.append({"prompt": by_summary[summary], "chosen": f'{summary}"""', "rejected": f'{rejected}"""'})
    return out


def write_stdlib_pairs(path: str | Path, n: int, seed: int = 0, *, as_messages: bool = False,
                       kind: str = "truncated") -> Path:
    """The pairs as JSONL at `path` (written atomically); as_messages: each prompt as a user turn (for a chat
    template) instead of plain text."""
    pairs = stdlib_pairs(n, seed, kind)
    if as_messages:
        pairs = [{"messages": [{"role": "user", "content": p.pop("prompt")}], **p} for p in pairs]
    return write_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
