"""The built-in corpus: this Python's standard-library source, as two datasets and a tokenizer sample.

`library` holds the modules, `tests` their test suites: for two-stage pretraining (paper section 5) the library
modules play the higher-quality data (written for reading, with docstrings and varied code), the test suites the
bulk (long runs of near-identical assertions). Files are cut at blank lines into pieces of ~1.5-2 KB, so that the
document shuffle of each epoch mixes code from many files within every training window; the held-out split is made
of whole files.
"""

from __future__ import annotations

import json
import random
import sysconfig
from fractions import Fraction
from pathlib import Path

from minicpm.files import write_atomic

PIECE_CHARS = 1500
VAL_FRACTION = Fraction(1, 50)
"""Share of pieces held out (whole files) for evaluation."""
TOKENIZER_SAMPLE_EVERY = 3
"""The tokenizer learns from every third piece (~10 MB)."""


def is_test_file(relative: Path) -> bool:
    """Whether a file (its path relative to the standard library) belongs to the test suite."""
    return any(part in ("test", "tests", "idle_test") for part in relative.parts[:-1]) or \
        relative.name.startswith("test_")


def split_into_pieces(text: str, min_chars: int = PIECE_CHARS) -> list[str]:
    """A source file cut at blank lines into pieces of at least min_chars characters (the last may be shorter)."""
    pieces, current = [], ""
    for block in text.split("\n\n"):
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= min_chars:
            pieces.append(current)
            current = ""
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def holdout_order(files: list[list[str]], fraction: Fraction, seed: int) -> list[str]:
    """The pieces of all files in one order such that prepare's held-out rule (is_held_out) takes whole files:
    held-out files are drawn at random until they fill the held-out positions (only the last one drawn may spill
    pieces into training). Their pieces are shuffled, so the first held-out windows span many files."""
    from minicpm.data.prepare import is_held_out

    rng = random.Random(seed)
    slots = [is_held_out(i, fraction) for i in range(sum(len(pieces) for pieces in files))]
    wanted = sum(slots)
    picked = list(range(len(files)))
    rng.shuffle(picked)
    held: list[str] = []
    chosen = set()
    for index in picked:
        if len(held) >= wanted:
            break
        held += files[index]
        chosen.add(index)
    train = held[wanted:] + [p for i, pieces in enumerate(files) if i not in chosen for p in pieces]
    held = held[:wanted]
    rng.shuffle(held)
    held_it, train_it = iter(held), iter(train)
    return [next(held_it) if slot else next(train_it) for slot in slots]


def _generated(text: str) -> bool:
    # the codec tables in encodings/ are generated data (gencodec.py), not code anyone wrote
    return "gencodec.py" in text[:2000]


def write_corpus(out: Path, file_stride: int = 1) -> dict[str, Path]:
    """The stdlib's .py files as JSON-lines corpora under `out`: library.jsonl, tests.jsonl and sample.jsonl (a
    sample of both to train the tokenizer on); existing files are kept. file_stride reads every n-th file."""
    from minicpm.data.sources import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = {name: out / f"{name}.jsonl" for name in ("library", "tests", "sample")}
    if all(p.is_file() for p in paths.values()):
        return paths
    files: dict[str, list[list[str]]] = {"library": [], "tests": []}
    for file in stdlib_files()[::file_stride]:
        try:
            text = file.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # the few deliberately mis-encoded test files
        pieces = split_into_pieces(text)
        if pieces and not _generated(text):
            files["tests" if is_test_file(file.relative_to(root)) else "library"].append(pieces)
    documents = {name: holdout_order(pieces, VAL_FRACTION, seed=0) for name, pieces in files.items()}
    documents["sample"] = [d for name in ("library", "tests") for d in documents[name][::TOKENIZER_SAMPLE_EVERY]]
    for name, path in paths.items():
        write_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in documents[name]))
    return paths
