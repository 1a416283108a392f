"""Reading torch.distributed.checkpoint folders without running code from them.

DCP's FileSystemReader reads a checkpoint's `.metadata` with plain `pickle.load`, so a
crafted file in a checkpoint someone shares could run any code on `autotp export`,
`autotp eval` or a resume. `SafeReader` is a FileSystemReader (DCP's own extension point,
passed as `storage_reader=`) whose metadata unpickler resolves only the classes a DCP
metadata file holds (`ALLOWED`), and which refuses "bytes" items, the only kind DCP
reads back with an unrestricted `torch.load`; tensors are read with `weights_only=True`.

    reader = SafeReader(path)
    why = problem(path)            # None, or why the folder is not a complete checkpoint
    dcp.load(state, storage_reader=SafeReader(path))
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

from ..common.errors import CheckpointError, first_line

__all__ = ["ALLOWED", "SafeReader", "problem"]

_DCP = "torch.distributed.checkpoint"
# (module, name) pairs a DCP metadata pickle may name; torch's dtypes are allowed too
ALLOWED = frozenset(
    {
        (f"{_DCP}.metadata", n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }  # fmt: skip
    | {
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a name -> torch.strided lookup
        ("collections", "OrderedDict"),
    }
    | {
        (module, name)
        for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source} asks to load {module}.{name}, which a checkpoint's metadata "
            "never holds: refused, nothing from the file was run",
            hint="only load checkpoints you trust; this one may have been tampered with",
        )


class SafeReader(FileSystemReader):
    """A FileSystemReader that never unpickles anything but DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f, str(path)).load()
        except CheckpointError:
            raise
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing: not a complete checkpoint") from e
        except Exception as e:  # truncated or garbage: pickle raises many kinds
            raise CheckpointError(
                f"{path} cannot be read ({type(e).__name__}: {e}): a damaged checkpoint"
            ) from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        storage_meta: StorageMeta | None = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(
                    f"{self.path}: {item.dest_index.fqn} is stored as pickled bytes, which "
                    "autotp never writes and will not unpickle: refused"
                )
        return super().read_data(plan, planner)


def _described(meta: Any) -> bool:
    """autotp.json holds what a resume, export or eval reads, with the types it expects."""
    kinds = {"model": str, "tp": int, "step": int, "splits": dict, "shapes": dict}
    return (
        isinstance(meta, dict)
        and all(isinstance(meta.get(k), t) for k, t in kinds.items())
        and isinstance(meta.get("tied", {}), dict)
        and all(isinstance(v, list) for v in meta["shapes"].values())
        and all(v is None or isinstance(v, list) for v in meta["splits"].values())
    )


def problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` is not a complete, readable checkpoint, or None when it is: autotp.json
    and .metadata must read, and every shard file named in the metadata must exist and be
    long enough for what it is said to hold."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    if not (path / "autotp.json").is_file():
        return f"{path / 'autotp.json'} is missing"
    try:
        import json

        meta = json.loads((path / "autotp.json").read_text())
    except (OSError, ValueError) as e:
        return f"{path / 'autotp.json'} cannot be read ({e})"
    if not _described(meta):
        return f"{path / 'autotp.json'} is not an autotp checkpoint's description"
    try:
        metadata = SafeReader(str(path)).read_metadata()
    except CheckpointError as e:
        return first_line(e)
    ends: dict[str, int] = {}
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not isinstance(metadata.state_dict_metadata, dict):
        return f"{path / '.metadata'} does not describe a DCP checkpoint"
    for info in storage.values():
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset",
                                                                 "length"))  # fmt: skip
        if not (isinstance(rel, str) and isinstance(offset, int) and isinstance(length, int)):
            return f"{path / '.metadata'} holds a malformed storage entry"
        ends[rel] = max(ends.get(rel, 0), offset + length)
    for rel, end in sorted(ends.items()):
        file = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{path / '.metadata'} names a file outside the checkpoint ({rel})"
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size < end:
            return f"{file} is truncated ({size:,} bytes; the metadata needs {end:,})"
    return None
