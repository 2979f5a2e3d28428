"""torch.distributed.checkpoint (DCP) shards read without running code from the checkpoint.

DCP writes `.metadata` with pickle.dump and its FileSystemReader reads it back with pickle.load (torch 2.13,
distributed/checkpoint/filesystem.py), so a crafted file runs anything when a checkpoint is loaded. Here it is
read by an Unpickler that resolves only the globals DCP's own metadata is made of, found by saving real
checkpoints of a model and its AdamW state (plain tensors and FSDP2 DTensors): DCP's metadata dataclasses,
torch.Size, torch dtypes, the layout lookup torch.serialization._get_layout and pathlib.PosixPath (the
checkpoint_id DCP records). Anything else is refused before it is called. The result is then checked for the
shape DCP gives it (types, chunk bounds, shard files inside the directory) so that DCP never sees a malformed one.

What else dcp.load unpickles, and how it is covered:
- tensor entries: torch.load(weights_only=True) of their byte ranges, torch's own restricted unpickler;
- non-tensor ("bytes") entries: DefaultLoadPlanner.load_bytes calls torch.load(weights_only=False), a plain
  pickle. Whether an entry is read as bytes is decided by the metadata, not by the state dict given to load, so
  a crafted `.metadata` could turn a weight into a pickle. minicpm's shards hold only tensors: the metadata may
  not declare a bytes entry, and SafeFileSystemReader.read_data refuses bytes reads as well;
- with a process group, DCP passes plans, metadata and exceptions between ranks with pickle; those are objects
  our own processes made after the checks above, not bytes from the checkpoint.
"""

from __future__ import annotations

import pathlib
import pickle
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.serialization import _get_layout

from minicpm.errors import MiniCPMError
from minicpm.files import safe_relative

METADATA_FILE = ".metadata"

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls
       for cls in (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties,
                   MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING, _StorageInfo)},
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _get_layout,  # a lookup of torch.strided etc. by name
    # StorageMeta.checkpoint_id is the Path dcp.save was given (pathlib._local from Python 3.13 on)
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,
}


class _ForbiddenGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only _ALLOWED_GLOBALS and torch dtypes; any other global ends the load before it is used."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _ForbiddenGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _ForbiddenGlobal("persistent_id", repr(pid)[:60])


def read_dcp_metadata(path: str | Path, *, rank: int | None = None) -> Metadata:
    """The Metadata of DCP shards, read without running code from the file; `path` is the shards directory (or
    its .metadata file); rank reads the per-rank `__RANK.metadata` DCP writes without collectives. A file that
    asks for any other global, or whose content is not shaped as DCP writes it, is one MiniCPMError naming it."""
    path = Path(path)
    directory, file = (path.parent, path) if path.is_file() else (path, path / _metadata_name(rank))
    return _read_metadata_file(file, directory)


def _metadata_name(rank: int | None) -> str:
    return METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"


def _read_metadata_file(file: Path, directory: Path) -> Metadata:
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise MiniCPMError(f"{file}: no such file (the DCP shards are incomplete)") from None
    except _ForbiddenGlobal as e:
        raise MiniCPMError(f"{file}: refused: the pickle asks for {e}, which is not part of DCP checkpoint "
                           f"metadata (nothing from the file was run)") from None
    except OSError as e:
        raise MiniCPMError(f"{file}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, ValueError, TypeError, ...
        raise MiniCPMError(f"{file}: not DCP checkpoint metadata ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
    _check_metadata(metadata, file, directory)
    return metadata


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _check_metadata(md: object, file: Path, directory: Path) -> None:
    """DCP's Metadata, shaped as DCP writes it; else one MiniCPMError naming the file and the entry."""
    def fail(what: str) -> None:
        raise MiniCPMError(f"{file}: {what}")

    if type(md) is not Metadata:
        fail(f"holds a {type(md).__name__}, not DCP checkpoint metadata")
    entries = md.state_dict_metadata
    if type(entries) is not dict:
        fail("state_dict_metadata is not a dict")
    for key, entry in entries.items():
        if not isinstance(key, str):
            fail(f"entry name {key!r} is not a string")
        if type(entry) is BytesStorageMetadata:
            fail(f"entry {key!r} is a pickled object, not a tensor; minicpm checkpoints hold only tensors "
                 f"(refused, as DCP would unpickle it with plain pickle)")
        if type(entry) is not TensorStorageMetadata:
            fail(f"entry {key!r} is a {type(entry).__name__}, not tensor metadata")
        _check_tensor_entry(key, entry, fail)
    storage = md.storage_data
    if type(storage) is not dict:
        fail("storage_data is not a dict")
    for index, info in storage.items():
        if type(index) is not MetadataIndex or not isinstance(index.fqn, str) or index.fqn not in entries:
            fail(f"storage_data key {index!r} does not name an entry")
        if type(info) is not _StorageInfo:
            fail(f"storage of {index.fqn!r} is a {type(info).__name__}, not DCP's _StorageInfo")
        _check_storage(index.fqn, info, directory, file, fail)
    if md.planner_data is not None and not (
            type(md.planner_data) is dict
            and all(isinstance(k, str) and type(v) in (tuple, list) and all(isinstance(p, (str, int)) for p in v)
                    for k, v in md.planner_data.items())):
        fail("planner_data is not a dict of key paths")
    meta = md.storage_meta
    if meta is not None and not (
            type(meta) is StorageMeta
            and (meta.checkpoint_id is None or isinstance(meta.checkpoint_id, (str, PurePath)))
            and all(v is None or isinstance(v, str) for v in (meta.save_id, meta.load_id))
            and type(meta.modules) is list and all(isinstance(m, str) for m in meta.modules)):
        fail("storage_meta is not DCP's StorageMeta")
    if md.version is not None and not isinstance(md.version, str):
        fail(f"version {md.version!r} is not a string")


def _check_tensor_entry(key: str, entry: TensorStorageMetadata, fail) -> None:
    props = entry.properties
    if type(props) is not TensorProperties or not isinstance(props.dtype, torch.dtype):
        fail(f"entry {key!r} has no tensor dtype")
    if type(entry.size) is not torch.Size:
        fail(f"entry {key!r}: size {entry.size!r} is not a torch.Size")
    if type(entry.chunks) is not list:
        fail(f"entry {key!r}: chunks is not a list")
    for chunk in entry.chunks:
        if (type(chunk) is not ChunkStorageMetadata or type(chunk.offsets) is not torch.Size
                or type(chunk.sizes) is not torch.Size
                or not len(chunk.offsets) == len(chunk.sizes) == len(entry.size)
                or any(o < 0 or s < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size))):
            fail(f"entry {key!r}: a chunk lies outside the tensor's size {list(entry.size)}")


def _check_storage(fqn: str, info: _StorageInfo, directory: Path, file: Path, fail) -> None:
    safe_relative(directory, info.relative_path, where=f"{file}: shard file of {fqn!r}")
    for field in ("offset", "length"):
        value = getattr(info, field, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail(f"storage of {fqn!r}: {field} {value!r} is not an integer >= 0")
    transforms = getattr(info, "transform_descriptors", None)
    if transforms is not None and not (type(transforms) in (list, tuple)
                                       and all(isinstance(t, str) for t in transforms)):
        fail(f"storage of {fqn!r}: transform_descriptors is not a list of names")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read by read_dcp_metadata (never by plain pickle) and which refuses
    to read bytes entries (DCP unpickles those with plain pickle). Pass it as dcp.load(storage_reader=...)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path), rank=kwargs.get("rank"))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise MiniCPMError(f"{self.path}: entry {item.storage_index.fqn!r} would be unpickled; minicpm "
                                   f"checkpoints hold only tensors (refused)")
        return super().read_data(plan, planner)


def load_dcp(state: dict[str, Any], directory: str | Path, *, no_dist: bool) -> None:
    """dcp.load of `state` (tensors, in place) from a shards directory through SafeFileSystemReader; any failure
    is one MiniCPMError naming the directory (the original exception is kept as its cause, for --debug)."""
    directory = Path(directory)
    # read (and refuse) the metadata here first: inside dcp.load a refusal would be logged with a traceback
    # and answered by a search for per-rank metadata, ending in a message about that instead
    read_dcp_metadata(directory)
    with warnings.catch_warnings():
        # one process reading N processes' shards is intended; DCP warns that it assumes so
        warnings.filterwarnings("ignore", message=".*load in a single process")
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(directory), no_dist=no_dist)
        except CheckpointException as e:  # DCP wraps every rank's exception into this BaseException
            cause = _first_failure(e)
            if isinstance(cause, MiniCPMError):
                raise MiniCPMError(str(cause)) from None
            raise MiniCPMError(f"{directory}: cannot load the checkpoint shards ({type(cause).__name__}: "
                               f"{_first_line(cause)})") from cause
        except (OSError, ValueError, RuntimeError, AssertionError) as e:
            raise MiniCPMError(f"{directory}: cannot load the checkpoint shards ({type(e).__name__}: "
                               f"{_first_line(e)})") from e


def _first_failure(e: CheckpointException) -> BaseException:
    failures: Mapping[int, Any] = e.failures
    for rank in sorted(failures):
        exc = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(exc, BaseException):
            return exc
    return e
