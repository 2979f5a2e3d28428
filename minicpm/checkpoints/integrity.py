"""Checkpoint manifests: SHA-256 and size of every file.

A checkpoint's trainer_state.json, written last, can record file_digests() of everything written before it;
verify_digests() then tells a complete, intact checkpoint from a truncated or bit-flipped one before any of it is
trusted. Hashing streams the files in 1 MiB chunks, so a checkpoint of any size costs one read and little memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.files import safe_relative

CHUNK_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
STATE_DIGEST = "state_sha256"
"""The trainer_state.json key holding the SHA-256 of everything else in it: the manifest covers every file of a
checkpoint but the one it lives in, and this digest covers that one."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: str | Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """{relative POSIX path: {"sha256": hex, "bytes": size}} of every regular file under `directory`, its
    subdirectories (e.g. dcp/) and hidden files (dcp/.metadata) included, in sorted path order. `exclude` names
    relative paths to leave out (e.g. the trainer_state.json that will hold the manifest). A symbolic link is an
    error: a checkpoint holds its own files."""
    root = Path(directory)
    if not root.is_dir():
        raise MiniCPMError(f"{root}: no such directory")
    skipped = set(exclude)
    found: dict[str, Path] = {}
    for folder, subdirs, files in os.walk(root):
        for name in (*subdirs, *files):
            path = Path(folder, name)
            if path.is_symlink():
                raise MiniCPMError(f"{path}: a symbolic link; a checkpoint must hold its own files")
        for name in files:
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if relative not in skipped:
                found[relative] = path
    digests = {}
    for relative in sorted(found):
        path = found[relative]
        digests[relative] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return digests


def check_manifest(manifest: object, where: str) -> dict[str, dict[str, Any]]:
    """The manifest if it has file_digests()'s shape; else one MiniCPMError naming `where` and the entry."""
    if not isinstance(manifest, Mapping):
        raise MiniCPMError(f"{where}: expected a mapping of file names to digests, got {type(manifest).__name__}")
    for name, entry in manifest.items():
        if not isinstance(name, str) or not name:
            raise MiniCPMError(f"{where}: file name {name!r} is not a non-empty string")
        if not isinstance(entry, Mapping):
            raise MiniCPMError(f"{where}: entry {name!r} is not a mapping with sha256 and bytes")
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
            raise MiniCPMError(f"{where}: entry {name!r}: sha256 {digest!r} is not 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MiniCPMError(f"{where}: entry {name!r}: bytes {size!r} is not an integer >= 0")
    return dict(manifest)


def verify_digests(directory: str | Path, manifest: Mapping[str, Mapping[str, Any]], *,
                   source: str | None = None) -> None:
    """Check that every file the manifest lists is inside `directory`, present, of the recorded size and of the
    recorded SHA-256; the first that is not is one MiniCPMError naming it. Sizes are checked for all files before
    any is hashed, so a truncated file is found without reading the others. Files the manifest does not list are
    not looked at. `source` names the file the manifest came from (for a malformed manifest's message)."""
    root = Path(directory)
    entries = check_manifest(manifest, source or f"{root}: manifest")
    paths = {name: safe_relative(root, name, where=source) for name in sorted(entries)}
    for name, path in paths.items():
        if not path.is_file():
            raise MiniCPMError(f"{path}: missing (the checkpoint's manifest lists it)")
        size = path.stat().st_size
        if size != entries[name]["bytes"]:
            raise MiniCPMError(f"{path}: {size} bytes, the manifest records {entries[name]['bytes']} "
                               f"(truncated or overwritten)")
    for name, path in paths.items():
        if sha256_file(path) != entries[name]["sha256"]:
            raise MiniCPMError(f"{path}: SHA-256 differs from the manifest (the file is corrupt)")


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a trainer state less its own digest, serialized canonically (sorted keys, no spaces): it covers
    every value a resume reads, whatever the file's layout."""
    body = {key: value for key, value in state.items() if key != STATE_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def sealed_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer state as JSON gives it back (tuples as lists, keys as strings) with its digest added, so that
    the digest of the file read back equals the one written."""
    plain = json.loads(json.dumps(state))
    plain.pop(STATE_DIGEST, None)
    return {**plain, STATE_DIGEST: state_digest(plain)}
