"""Files written so that no reader ever sees half of one, and JSON read with errors that name the file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
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


def _beyond_limits(e: ValueError | RecursionError) -> str:
    """What json rejects past its parser's limits: nesting deeper than the recursion limit, integers longer than
    Python's digit limit for int conversion."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(":")[0]
