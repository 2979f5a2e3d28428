"""Atomic writes and JSON reading with one-line errors (minicpm.files)."""

import os
import stat

import pytest

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_directory, json_object_line, read_json_object, write_atomic


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary_on_failure(tmp_path):
    path = write_atomic(tmp_path / "sub" / "a.json", "{\"é\": 1}\n")
    assert path.read_bytes() == "{\"é\": 1}\n".encode("utf-8")
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError):
        write_atomic(path, 123)  # fails after the temporary file was made
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


@pytest.mark.parametrize("content, message", [
    (None, r"x\.json: no such file; part of a checkpoint$"),
    (b'{"a": ', r"x\.json: not valid JSON \(Expecting value at line 1\)"),
    (b"[1, 2]", r"x\.json: expected a JSON object$"),
    (b'{"a": "\xff"}', r"x\.json: not valid JSON \(not UTF-8 text\)"),
])
def test_read_json_object_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MiniCPMError, match=message):
        read_json_object(path, missing="; part of a checkpoint")


def test_read_json_object_reads_an_object(tmp_path):
    (tmp_path / "x.json").write_text('{"a": [1, 2]}')
    assert read_json_object(tmp_path / "x.json") == {"a": [1, 2]}


def test_json_object_line_names_file_and_line():
    assert json_object_line('{"text": "hi"}', "d.jsonl:3") == {"text": "hi"}
    with pytest.raises(MiniCPMError, match=r"^d\.jsonl:3: not valid JSON \(Expecting value at column 9\)$"):
        json_object_line('{"text":', "d.jsonl:3")
    with pytest.raises(MiniCPMError, match=r"^d\.jsonl:3: expected a JSON object, got list$"):
        json_object_line("[1]", "d.jsonl:3")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_outputs_get_the_permissions_of_a_plain_open_and_mkdir(tmp_path, umask):
    """mkstemp/mkdtemp make private files; a run's outputs must stay readable to the other users and machines of
    a shared file system, as files written with open() are."""
    old = os.umask(umask)
    try:
        written = write_atomic(tmp_path / "result.json", "{}")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"0")
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "f").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(written) == mode(plain / "f") == 0o666 & ~umask
    assert mode(tmp_path / "model") == mode(plain) == 0o777 & ~umask
