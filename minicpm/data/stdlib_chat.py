"""Built-in chat data with no download: questions about this Python's standard library, answered by its own
docstrings.

Each public function or method with a docstring in the stdlib's library modules (not its test suites) becomes one
example: the user gives its signature (`json.dumps(obj, *, skipkeys=False, ...)`), the assistant answers with
the docstring's first paragraph. The source is parsed (`ast`), never imported. The same examples serve
preference pairs (DPO): chosen = the true docstring, rejected = another function's (`stdlib_examples` gives the
examples; `sft_record` one SFT line).
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from minicpm.files import write_atomic

MIN_ANSWER_CHARS = 24
MAX_ANSWER_CHARS = 320
MAX_SIGNATURE_CHARS = 120


@dataclass(frozen=True)
class StdlibExample:
    """One documented stdlib function: where it lives, its signature and its docstring's first paragraph."""

    module: str
    qualname: str
    signature: str
    docstring: str

    @property
    def question(self) -> str:
        return f"What does {self.module}.{self.qualname}({self.signature}) do?"


def _first_paragraph(doc: str) -> str:
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _examples_of(path: Path, module: str) -> list[StdlibExample]:
    try:
        tree = ast.parse(path.read_bytes().decode("utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node, clean=False)
                if not doc:
                    continue
                answer, signature = _first_paragraph(doc), ast.unparse(node.args)
                if (MIN_ANSWER_CHARS <= len(answer) <= MAX_ANSWER_CHARS and len(signature) <= MAX_SIGNATURE_CHARS
                        and ">>>" not in answer):
                    out.append(StdlibExample(module, prefix + node.name, signature, answer))

    visit(tree.body, "")
    return out


def stdlib_examples(*, limit: int | None = None, seed: int = 0, file_stride: int = 1) -> list[StdlibExample]:
    """Documented public functions of the stdlib's library modules, in a seeded random order, at most `limit`;
    two with the same answer keep only the first. file_stride reads every n-th file (small sets for tests)."""
    from minicpm.data.sources import stdlib_files
    from minicpm.data.stdlib_corpus import is_test_file

    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[StdlibExample] = []
    for path in stdlib_files()[::file_stride]:
        relative = path.relative_to(root)
        if is_test_file(relative) or relative.parts[0] in ("idlelib", "lib2to3", "site-packages"):
            continue
        found += _examples_of(path, _module_name(path, root))
    seen, unique = set(), []
    for example in found:
        if example.docstring not in seen:
            seen.add(example.docstring)
            unique.append(example)
    random.Random(seed).shuffle(unique)
    return unique[:limit] if limit is not None else unique


def sft_record(example: StdlibExample) -> dict:
    """One chat JSON line: the question, answered by the docstring."""
    return {"messages": [{"role": "user", "content": example.question},
                         {"role": "assistant", "content": example.docstring}]}


def write_stdlib_chat(path: str | Path, *, limit: int | None = 3000, seed: int = 0, file_stride: int = 1) -> Path:
    """The SFT examples as chat JSONL at `path` (kept when it exists)."""
    path = Path(path)
    if not path.is_file():
        examples = stdlib_examples(limit=limit, seed=seed, file_stride=file_stride)
        write_atomic(path, "".join(json.dumps(sft_record(e), ensure_ascii=False) + "\n" for e in examples))
    return path
