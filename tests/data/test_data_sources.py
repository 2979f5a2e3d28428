"""Corpus readers: formats, order, origins, and one-line errors that name the file and line."""

import gzip
import json
import sysconfig
from itertools import islice
from pathlib import Path

import pytest

from minicpm.data.sources import SourceOptions, iter_corpus, iter_documents, stdlib_files
from minicpm.errors import MiniCPMError


def texts(spec, **options):
    return [d.text for d in iter_documents(spec, SourceOptions(**options))]


def test_directory_reads_every_visible_file_sorted_one_document_each(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("secret")
    docs = list(iter_documents(str(tmp_path)))
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[1].origin == str(tmp_path / "b" / "2.txt") and docs[1].line == 1


def test_glob_expands_sorted_and_recursive(tmp_path):
    for name in ["z.py", "a.py", "sub/m.py", "notes.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert texts(str(tmp_path / "**" / "*.py")) == ["a.py", "sub/m.py", "z.py"]


def test_jsonl_by_extension_and_forced_with_field_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first", "body": "b1"}\n\n{"text": "second", "body": "b2"}\n')
    docs = list(iter_documents(str(path)))
    assert [(d.text, d.line) for d in docs] == [("first", 1), ("second", 3)]
    assert texts(str(path), field="body") == ["b1", "b2"]
    forced = tmp_path / "records.log"
    forced.write_text('{"text": "x"}\n')
    assert texts(f"jsonl:{forced}") == ["x"]
    assert texts(str(forced)) == ['{"text": "x"}\n']  # by extension: plain text


def test_gzipped_jsonl_and_text(tmp_path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped 😀"}) + "\n")
    with gzip.open(tmp_path / "t.txt.gz", "wt") as f:
        f.write("plain\n")
    assert texts(str(tmp_path / "d.jsonl.gz")) == ["zipped 😀"]
    assert texts(str(tmp_path / "t.txt.gz")) == ["plain\n"]


def test_parquet_column_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["r1", None, "r3"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    docs = list(iter_documents(str(tmp_path / "d.parquet"), SourceOptions(column="content")))
    assert [(d.text, d.line) for d in docs] == [("r1", 1), ("r3", 3)]
    with pytest.raises(MiniCPMError, match=r"d\.parquet: no column 'text' \(columns: content, n"):
        list(iter_documents(str(tmp_path / "d.parquet")))


def test_stdlib_corpus_is_sorted_python_source_without_site_packages():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(f.suffix == ".py" and "site-packages" not in f.relative_to(root).parts for f in files)
    first = list(islice(iter_documents("stdlib"), 5))
    assert [d.origin for d in first] == sorted(d.origin for d in first)
    assert all(isinstance(d.text, str) for d in first)


def test_iter_corpus_keeps_spec_order(tmp_path):
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.txt").write_text("B")
    pairs = list(iter_corpus([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]))
    assert [(spec.endswith("b.txt"), d.text) for spec, d in pairs] == [(True, "B"), (False, "A")]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "bad\xff"}\n', r"d\.jsonl:2: invalid UTF-8 \(byte 0xff"),
    (b'{"text": "ok"}\n{"text": oops}\n', r"d\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n\n{"body": "x"}\n', r"d\.jsonl:3: no field 'text' \(keys: body"),
    (b'{"text": 5}\n', r"d\.jsonl:1: field 'text' is int, expected a string"),
    (b'["text"]\n', r"d\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(MiniCPMError, match=message):
        list(iter_documents(str(tmp_path / "d.jsonl")))


def test_invalid_utf8_in_text_names_line_and_column(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nfine\nab\xc3(\n")
    with pytest.raises(MiniCPMError, match=r"bad\.txt:3: invalid UTF-8 \(byte 0xc3 at column 3\)"):
        list(iter_documents(str(tmp_path / "bad.txt")))


def test_missing_unreadable_and_empty_globs_are_errors(tmp_path):
    with pytest.raises(MiniCPMError, match="nope.txt: no such file or directory"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone")
    with pytest.raises(MiniCPMError, match=r"dangling\.txt: cannot read"):
        list(iter_documents(str(tmp_path / "dangling.txt")))
    with pytest.raises(MiniCPMError, match="matches no files"):
        list(iter_documents(str(tmp_path / "*.md")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniCPMError, match="holds no files"):
        list(iter_documents(str(tmp_path / "empty")))
