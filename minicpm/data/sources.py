"""Corpus readers: turn source specs into documents that remember where they came from.

A source spec (on the command line, or in a config) is one of

    stdlib                 the running Python's standard-library ``.py`` files, sorted by path; site-packages and
                           dist-packages are left out, and so are the few files that are not UTF-8 (the
                           encoding tests), so that the built-in corpus always reads
    PATH                   a file, by extension: ``.jsonl``/``.ndjson`` (optionally ``.gz``) → one document per
                           line, ``.parquet`` → one document per row, anything else → the whole file is one
                           document (``.gz`` is decompressed); a directory → every file under it, recursively,
                           sorted, hidden files and folders skipped
    GLOB                   a pattern with ``*``, ``?`` or ``[`` (``**`` recurses), expanded and sorted
    text:P | jsonl:P | parquet:P
                           force the format of P (a file, directory or glob)
    hf:NAME[:SPLIT]        a Hugging Face dataset (needs ``pip install 'minicpm[datasets]'``): a folder written by
                           ``save_to_disk``, or a hub name when online; SPLIT defaults to ``train``

JSON lines and HF datasets take the text from ``field`` (default ``text``), Parquet from ``column``. Blank JSONL
lines are skipped; empty documents are yielded (the caller decides what to do with them).
"""

from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from minicpm.errors import MiniCPMError
from minicpm.files import json_object_line

JSONL_SUFFIXES = (".jsonl", ".ndjson")
FORMATS = ("text", "jsonl", "parquet")


@dataclass(frozen=True)
class Document:
    """One document and its origin: the file it came from and its 1-based line (JSONL) or row (Parquet, HF)."""

    text: str
    origin: str
    line: int = 1

    @property
    def where(self) -> str:
        return f"{self.origin}:{self.line}"


@dataclass(frozen=True)
class SourceOptions:
    """How to read structured sources."""

    field: str = "text"     # JSON lines and HF datasets: the key that holds the text
    column: str = "text"    # Parquet: the column that holds the text


def iter_documents(spec: str, options: SourceOptions | None = None) -> Iterator[Document]:
    """Yield the documents of one source spec, in a fixed order (see the module docstring for the forms)."""
    options = options or SourceOptions()
    if spec == "stdlib":
        yield from _stdlib_documents()
        return
    if spec.startswith("hf:"):
        yield from _hf_documents(spec[3:], options.field)
        return
    forced, _, rest = spec.partition(":")
    if forced in FORMATS and rest:
        for path in expand_paths(rest):
            yield from _read_file(path, forced, options)
        return
    for path in expand_paths(spec):
        yield from _read_file(path, _format_of(path), options)


def iter_corpus(specs: Iterable[str], options: SourceOptions | None = None) -> Iterator[tuple[str, Document]]:
    """Yield (spec, document) over several specs, in order."""
    for spec in specs:
        for doc in iter_documents(spec, options):
            yield spec, doc


def stdlib_files() -> list[Path]:
    """The running Python's standard-library .py files, sorted; site-packages and dist-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in excluded]  # pruned, not walked: site-packages is large
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(f for f in files if f.is_file())


def _stdlib_documents() -> Iterator[Document]:
    for path in stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            # a handful of encoding tests are latin-1 or deliberately broken: the built-in corpus skips them
            continue
        yield Document(text, str(path), 1)


def source_roots(spec: str) -> list[Path]:
    """The local files and directories a source spec reads (none for stdlib and hf:; a glob's matches), so that
    a writer can keep its output out of them."""
    if spec == "stdlib" or spec.startswith("hf:"):
        return []
    forced, _, rest = spec.partition(":")
    pattern = rest if forced in FORMATS and rest else spec
    if any(c in pattern for c in "*?["):
        return [Path(p) for p in globlib.glob(pattern, recursive=True)]
    return [Path(pattern)]


def expand_paths(pattern: str) -> list[Path]:
    """A file, every visible file under a directory (sorted), or the sorted matches of a glob."""
    if any(c in pattern for c in "*?["):
        matches = sorted(Path(p) for p in globlib.glob(pattern, recursive=True))
        files = [p for p in matches if not p.is_dir()]
        if not files:
            raise MiniCPMError(f"{pattern}: the pattern matches no files")
        return files
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise MiniCPMError(f"{path}: the directory holds no files")
        return files
    if not path.exists() and not path.is_symlink():
        raise MiniCPMError(f"{path}: no such file or directory (a source is a path, a glob, 'stdlib', "
                           "'text:P', 'jsonl:P', 'parquet:P' or 'hf:NAME')")
    return [path]


def _format_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _read_file(path: Path, fmt: str, options: SourceOptions) -> Iterator[Document]:
    if fmt == "jsonl":
        yield from _jsonl_documents(path, options.field)
    elif fmt == "parquet":
        yield from _parquet_documents(path, options.column)
    else:
        yield Document(_decode(_read_bytes(path), path, 1), str(path), 1)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise MiniCPMError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _decode(data: bytes, path: Path, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise MiniCPMError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    try:
        f = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise MiniCPMError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        number = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:
                raise MiniCPMError(f"{path}:{number + 1}: cannot read ({getattr(e, 'strerror', None) or e})") from None
            if not raw:
                return
            number += 1
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            record = json_object_line(line, f"{path}:{number}")
            if field not in record:
                keys = ", ".join(sorted(record)[:8]) or "none"
                raise MiniCPMError(f"{path}:{number}: no field '{field}' (keys: {keys}; choose one with --field)")
            text = record[field]
            if not isinstance(text, str):
                raise MiniCPMError(f"{path}:{number}: field '{field}' is {type(text).__name__}, expected a string")
            yield Document(text, str(path), number)


def _parquet_documents(path: Path, column: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MiniCPMError(f"{path}: reading Parquet needs pyarrow (pip install 'minicpm[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise MiniCPMError(f"{path}: cannot read as Parquet ({e})") from None
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) on files that are not Parquet
        raise MiniCPMError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise MiniCPMError(f"{path}: no column '{column}' (columns: {', '.join(names)}; choose one with --column)")
    values = (v for batch in pf.iter_batches(batch_size=1024, columns=[column]) for v in batch.column(0).to_pylist())
    yield from _text_values(values, str(path), f"column '{column}'")


def _hf_documents(name_and_split: str, field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise MiniCPMError(f"hf:{name_and_split}: reading HF datasets needs `pip install 'minicpm[datasets]'`") from None
    name, _, split = name_and_split.partition(":")
    split = split or "train"
    try:
        with _hub_warnings_quiet():  # its retries are a warning line each; the error below says what failed
            ds = _load_hf(datasets, name, split)
    except Exception as e:  # the datasets library raises many types; the user needs the one line
        raise MiniCPMError(f"hf:{name_and_split}: cannot load "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if field not in ds.column_names:
        raise MiniCPMError(f"hf:{name_and_split}: no field '{field}' (columns: {', '.join(ds.column_names)})")
    yield from _text_values((example[field] for example in ds), f"hf:{name_and_split}", f"field '{field}'")


@contextlib.contextmanager
def _hub_warnings_quiet() -> Iterator[None]:
    """The Hub client's and datasets' warnings held back (each failed request retried is a line of its own)."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _load_hf(datasets, name: str, split: str):
    """A saved dataset directory (its `split` when it holds several), or a dataset of the Hub."""
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(name, split=split)


def _text_values(values: Iterator, origin: str, what: str) -> Iterator[Document]:
    """Rows of a table column as documents (row numbers from 1); missing values are skipped, others must be text."""
    for row, value in enumerate(values, start=1):
        if value is None:
            continue
        if not isinstance(value, str):
            raise MiniCPMError(f"{origin}:{row}: {what} is {type(value).__name__}, expected a string")
        yield Document(value, origin, row)
