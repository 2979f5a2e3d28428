"""Atomic writes, JSON reading with one-line errors, and index names kept inside their directory (minicpm.files)."""

import os
import stat

import pytest

from minicpm.errors import MiniCPMError
from minicpm.files import atomic_directory, json_object_line, read_json_object, safe_relative, write_atomic


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


# ------------------------------------------------------------------------------------------ names from index files

def assert_one_line(error: Exception, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_plain_relative_names_resolve_inside_the_root(tmp_path):
    assert safe_relative(tmp_path, "model-00001-of-00002.safetensors") == tmp_path / "model-00001-of-00002.safetensors"
    assert safe_relative(tmp_path, "dcp/__0_0.distcp") == tmp_path / "dcp" / "__0_0.distcp"


@pytest.mark.parametrize("name", ["../model.safetensors", "a/../../b", "/etc/passwd", "C:\\weights.bin",
                                  "..\\weights", "", ".", "a/..", "x\0y", 3, None])
def test_names_leaving_the_root_are_refused_in_one_line(tmp_path, name):
    with pytest.raises(MiniCPMError) as error:
        safe_relative(tmp_path, name, where="model.safetensors.index.json: weight_map")
    assert_one_line(error.value, "model.safetensors.index.json: weight_map", repr(name))


def test_a_symbolic_link_leading_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "shards").symlink_to(outside)
    with pytest.raises(MiniCPMError) as error:
        safe_relative(root, "shards/model.safetensors")
    assert_one_line(error.value, "'shards/model.safetensors'", "symbolic link")


def test_an_output_that_is_inside_or_contains_an_input_is_refused_even_through_a_link(tmp_path):
    from minicpm.files import check_output

    source = tmp_path / "source"
    source.mkdir()
    (tmp_path / "alias").symlink_to(source)
    for out, words in ((tmp_path / "alias", "is the input"), (source / "sub", "lies inside the input"),
                       (tmp_path, "contains the input")):
        with pytest.raises(MiniCPMError, match=words):
            check_output(out, inputs=[source], overwrite=True)


def test_an_output_directory_replaces_an_existing_one_only_when_complete_and_leaves_nothing_on_failure(tmp_path):
    from minicpm.files import output_directory

    out = tmp_path / "a/b/out"
    with pytest.raises(RuntimeError), output_directory(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # no temporary directory, and the parents made for it are gone
    out.mkdir(parents=True)
    (out / "old").write_text("old")
    with pytest.raises(MiniCPMError, match="already exists.*--overwrite"):
        with output_directory(out):
            pass
    with pytest.raises(RuntimeError), output_directory(out, overwrite=True) as tmp:
        raise RuntimeError("killed")
    assert [p.name for p in out.parent.iterdir()] == ["out"] and (out / "old").read_text() == "old"
    with output_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in out.parent.iterdir()] == ["out"]
