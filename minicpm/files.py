"""Files and directories written so that no reader ever sees half of one, JSON read with errors that name the
file, and file names read from an index kept inside their directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

from minicpm.errors import MiniCPMError


def plain_permissions(path: str | Path) -> Path:
    """Give a file or directory the permissions a plain open() or mkdir() would (0o666 or 0o777 less the umask):
    mkstemp and mkdtemp make them private to their owner, which would hide a run's files from the other users
    and machines of a shared file system. Returns `path`."""
    umask = os.umask(0)  # the umask can only be read by setting it; set it back at once
    os.umask(umask)
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(plain_permissions(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_object_line(line: str, where: str) -> dict[str, Any]:
    """One line of a JSONL file as an object; `where` (FILE:LINE) leads the one-line error otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise MiniCPMError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise MiniCPMError(f"{where}: not valid JSON ({_beyond_limits(e)})") from None
    if not isinstance(record, dict):
        raise MiniCPMError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_json_object(path: str | Path, *, missing: str = "") -> dict[str, Any]:
    """The JSON object in `path`; a missing file, invalid JSON or another JSON value is a one-line error
    (`missing` is added to the message for a missing file, e.g. what the file should have been part of)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MiniCPMError(f"{path}: no such file{missing}") from None
    except OSError as e:
        raise MiniCPMError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MiniCPMError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise MiniCPMError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:
        raise MiniCPMError(f"{path}: not valid JSON ({_beyond_limits(e)})") from None
    if not isinstance(data, dict):
        raise MiniCPMError(f"{path}: expected a JSON object")
    return data


def temporary_directory_for(final: str | Path, *, name: str | None = None) -> Path:
    """A fresh, empty hidden directory beside `final` to build it in (`name` fixes its name, so that several
    processes can find the same one; a leftover of that name from a killed writer is removed first)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        return plain_permissions(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp = final.parent / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_directory(tmp: str | Path, final: str | Path) -> Path:
    """Put the completed directory `tmp` in place of `final`. A new `final` appears by one rename; an existing one
    is renamed aside, replaced, then deleted, so a reader sees the old or the new directory, never a mix."""
    tmp, final = Path(tmp), Path(final)
    if final.exists() and not final.is_dir():
        raise MiniCPMError(f"{final}: exists and is not a directory")
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, name: str | None = None) -> Iterator[Path]:
    """Build a directory in a temporary one and publish it as `final` when the block ends without an error;
    on an error (or an interrupt) the temporary directory is deleted and `final` is left as it was."""
    tmp = temporary_directory_for(final, name=name)
    try:
        yield tmp
        publish_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 flag: str = "--out") -> Path:
    """The one rule for what a command may write (a directory, or a file such as a .gguf): `out` must not exist, or
    be an empty directory, unless `overwrite`; and it may never be, lie inside, or contain one of `inputs` (compared
    after symbolic links are resolved), overwrite or not. A refusal is one MiniCPMError naming `flag` and the
    paths, before anything is written. Returns `out` as a Path."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            raise MiniCPMError(f"{flag} {out} is the input {given}: an output never replaces what it is made from")
        if source in target.parents:
            raise MiniCPMError(f"{flag} {out} lies inside the input {given}: choose a directory outside it")
        if target in source.parents:
            raise MiniCPMError(f"{flag} {out} contains the input {given}: choose a directory that does not")
    if out.is_symlink() or out.exists():
        empty_directory = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if not (empty_directory or overwrite):
            what = "a non-empty directory" if out.is_dir() else "a file"
            raise MiniCPMError(f"{flag} {out}: already exists ({what}); choose a new one, or pass --overwrite to "
                               f"replace it once the new one is complete")
    return out


@contextlib.contextmanager
def output_directory(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                     flag: str = "--out") -> Iterator[Path]:
    """A command's output directory, by the rule of check_output: built in a temporary directory beside `out` and
    renamed into place (replacing an existing one, with `overwrite`) only when the block ends without an error; on
    an error or an interrupt nothing is left behind."""
    out = check_output(out, inputs=inputs, overwrite=overwrite, flag=flag)
    if out.exists() and not out.is_dir():
        raise MiniCPMError(f"{flag} {out}: exists and is not a directory")
    created = _missing_parents(out)
    try:
        with atomic_directory(out) as tmp:
            yield tmp
    except BaseException:
        for parent in created:  # the parents made for it, if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet, deepest first."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object of a JSONL file that a writer may have been killed in the middle of: a torn or
    invalid line is skipped, as is anything but an object. A missing file has no records."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise MiniCPMError(f"{path}: cannot read ({e.strerror or e})") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a torn line, or one past the parser's limits
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def safe_relative(root: str | Path, name: object, *, where: str | None = None) -> Path:
    """root/name, where `name` comes from an index or manifest (e.g. a safetensors weight_map value): it must be a
    relative path that stays inside root after symbolic links are resolved; anything else (`..`, an absolute or
    drive path, a backslash, a link leading out) is one MiniCPMError naming `where` (default: root) and the name."""
    root = Path(root)
    lead = where or str(root)
    if not isinstance(name, str) or not name:
        raise MiniCPMError(f"{lead}: file name {name!r} is not a non-empty string")
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts:
        raise MiniCPMError(f"{lead}: file name {name!r} points outside {root}")
    windows = PureWindowsPath(name)
    if "\0" in name or "\\" in name or windows.drive or windows.root:
        raise MiniCPMError(f"{lead}: file name {name!r} is not a plain relative path")
    path = root / posix
    inside = root.resolve()
    target = path.resolve()
    if target == inside:
        raise MiniCPMError(f"{lead}: file name {name!r} names {root} itself, not a file in it")
    if inside not in target.parents:
        raise MiniCPMError(f"{lead}: file name {name!r} leads outside {root} (through a symbolic link)")
    return path


def _beyond_limits(e: ValueError | RecursionError) -> str:
    """What json rejects past its parser's limits: nesting deeper than the recursion limit, integers longer than
    Python's digit limit for int conversion."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(":")[0]
