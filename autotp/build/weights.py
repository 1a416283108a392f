"""Weights read shard by shard from safetensors: what `save_pretrained` writes (one
`model.safetensors`, or a folder of shards with `model.safetensors.index.json`) or any
`.safetensors` file keyed by the model's state_dict names.

Each rank reads only its own slice of a split tensor, one tensor at a time, so a rank's
memory while loading stays near its own shard plus one tensor, never the whole model. A
shard that is one run of rows (or a whole tensor) in the file's dtype is not copied: it is
a private, copy-on-write map of exactly its bytes, which costs no private memory until
written; columns are copied out through safetensors.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from ..common.errors import AutoTPError
from ..common.tensor_names import names_by_tensor
from ..integrations.hf_keys import Conversions, Source
from ..sharding import Shard

__all__ = ["Weights", "fill_buffers", "init_missing", "unsaved_buffers"]

_INDEX = "model.safetensors.index.json"


class Weights:
    """The tensors of a safetensors file or folder, by name, read slice by slice."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        prefix: str = "",
        conversions: Conversions | Callable[[], Conversions | None] | None = None,
    ) -> None:
        """`prefix`: the model's base-model prefix (transformers' `base_model_prefix`,
        e.g. "bert"): a task model reads a base model's file and the other way round, as
        `from_pretrained` does. `conversions`: the model's checkpoint key conversion
        (tensors stored under other names, or in parts), or a function making it, called
        only when a name is not in the file as it is (transformers builds its mapping by
        compiling hundreds of patterns: a file saved by the same version never needs it)."""
        from safetensors import safe_open

        self.prefix = prefix
        self._conversions = conversions
        self._converted: dict[str, Source] = {}

        path = Path(path)
        if path.is_dir():
            index = path / _INDEX
            single = path / "model.safetensors"
            if index.is_file():
                files = json.loads(index.read_text())["weight_map"]
                where = {name: path / f for name, f in files.items()}
            elif single.is_file():
                where = None
                path = single
            else:
                raise AutoTPError(
                    f"{path} holds neither model.safetensors nor {_INDEX}",
                    hint="pass what save_pretrained(folder) wrote, or one .safetensors file",
                )
        elif path.is_file():
            where = None
        else:
            raise AutoTPError(f"weights: {path} does not exist")
        if where is None:
            with safe_open(str(path), framework="pt") as f:
                where = dict.fromkeys(f.keys(), path)
        self.path = path
        self._where: dict[str, Path] = where
        self._open: dict[Path, Any] = {}  # safetensors' handles (untyped)
        self._layouts: dict[Path, _Layout] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str) -> _Slice:
        if name in self._converted:  # made whole from the file's parts, then cut as one
            return _Whole(self._converted[name].build(lambda k: self._slice(k)[:]))
        from safetensors import safe_open

        file = self._where[name]
        if file not in self._open:  # a handle per file, kept: opening maps it once
            self._open[file] = safe_open(str(file), framework="pt")
        found: _Slice = self._open[file].get_slice(name)
        return found

    def read(
        self, name: str, spec: Shard | None = None, rank: int = 0, tp: int = 1,
        dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Tensor `name`, or rank `rank`'s shard of it under `spec` (as
        materialise.cut gives: padded rows zero, parts' slices concatenated), read alone.
        `shape`: the model's, which the stored tensor must have."""
        sl = self._slice(name)
        stored = tuple(sl.get_shape())
        if shape is not None and stored != shape:
            where = self._where.get(name, "its parts" if name in self._converted else "?")
            raise AutoTPError(
                f"{name} is {list(stored)} in {where} but {list(shape)} in the model",
                hint="pass the weights saved from this model's configuration",
            )
        shape = stored
        if spec is None:
            d, ranges = 0, [(0, shape[0])] if shape else []
        else:
            d, size = spec.dim, shape[spec.dim]
            ranges = spec.ranges(spec.padded or size, rank, tp)
        if d == 0 and len(ranges) == 1 and ranges[0][1] <= shape[0]:  # one run of rows
            rows = self._rows(name, *ranges[0], dtype)
            if rows is not None:
                return rows
        if spec is None:
            out = sl[:] if shape else sl[()]
            return _owned(out, dtype)
        if all(hi <= size for _, hi in ranges):  # columns of the mapped rows: one copy
            whole = self._rows(name, 0, shape[0], dtype)
            if whole is not None:
                cut = [whole.narrow(d, lo, hi - lo) for lo, hi in ranges]
                return torch.cat(cut, dim=d) if len(cut) > 1 else cut[0].clone()
        parts = []
        for lo, hi in ranges:
            index = (slice(None),) * d + (slice(min(lo, size), min(hi, size)),)
            part = sl[index]
            if part.shape[d] < hi - lo:  # padded vocabulary rows: zero
                pad = list(part.shape)
                pad[d] = hi - lo - part.shape[d]
                part = torch.cat([part, part.new_zeros(pad)], dim=d)
            parts.append(part)
        return _owned(parts[0] if len(parts) == 1 else torch.cat(parts, dim=d), dtype)

    def _rows(self, name: str, lo: int, hi: int, dtype: torch.dtype | None) -> torch.Tensor | None:
        """Rows [lo, hi) of `name` in the file's dtype (`dtype`, if given): mapped
        privately (copy-on-write) rather than copied, so that they cost no private memory
        until written, as transformers' own TP loads such shards. None otherwise."""
        if name in self._converted or sys.byteorder != "little":
            return None  # safetensors stores little-endian bytes
        file = self._where[name]
        if file not in self._layouts:
            self._layouts[file] = _Layout(file)
        return self._layouts[file].rows(name, lo, hi, dtype)

    def find(self, names: list[str]) -> str | None:
        """The first of a tensor's names (tied weights have several) the file holds, as
        given, with the base-model prefix taken off or put on, or as the model's
        conversion stores it (renamed, or in parts: then a name `read` makes whole)."""
        found = next((n for n in names if n in self._where), None)
        if found is not None:
            return found
        if self.prefix:
            head = self.prefix + "."
            names = names + [n.removeprefix(head) if n.startswith(head) else head + n
                             for n in names]  # fmt: skip
            found = next((n for n in names if n in self._where), None)
        if found is not None or self.conversions is None:
            return found
        for n in names:  # stored under another name, or in parts
            renamed = next((c for c in self.conversions.names(n) if c in self._where), None)
            if renamed is not None:
                return renamed
            source = self.conversions.source(n, self._where)
            if source is not None:
                key = f"converted:{n}"
                self._converted[key] = source
                return key
        return None

    @property
    def conversions(self) -> Conversions | None:
        """The model's key conversion, made at the first name that needs it."""
        if callable(self._conversions):
            self._conversions = self._conversions()
        return self._conversions

    def missing(self, name: str) -> AutoTPError:
        """The error for a tensor on the meta device that these weights do not hold."""
        return AutoTPError(
            f"{name} is on the meta device and not in {self.path}",
            hint="pass weights= "
            "a file or folder holding every tensor of the model (what save_pretrained of "
            "this model class writes), or build the model with real tensors",
        )


class _Slice(Protocol):
    """A tensor read by parts: a safetensors slice, or a `_Whole`."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


class _Whole:
    """A tensor read like a safetensors slice (its shape, then an index)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.t[index]


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class _Layout:
    """Where each tensor's bytes lie in a safetensors file (its header: the format's 8-byte
    length, then JSON of dtype, shape and data offsets), to map a run of rows alone."""

    def __init__(self, file: Path) -> None:
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(size))
        self.file, self.start = file, 8 + size

    def rows(
        self, name: str, lo: int, hi: int, want: torch.dtype | None = None
    ) -> torch.Tensor | None:
        """Rows [lo, hi) of `name` (its first dimension) as a tensor over a private
        (copy-on-write) map of exactly their bytes, or None where its dtype is not plain
        or not `want`."""
        entry = self.header[name]
        dtype = _DTYPES.get(entry["dtype"])
        shape = entry["shape"]
        if dtype is None or (want is not None and dtype != want) or not shape or hi <= lo:
            return None
        row = math.prod(shape[1:]) * dtype.itemsize
        offset = self.start + entry["data_offsets"][0] + lo * row
        length = (hi - lo) * row
        if length == 0:
            return None
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.file, "rb") as f:
                mapped = mmap.mmap(f.fileno(), offset - aligned + length, offset=aligned,
                                   access=mmap.ACCESS_COPY)  # fmt: skip
        except OSError:  # out of maps (vm.max_map_count): copied instead
            return None
        flat = torch.frombuffer(mapped, dtype=dtype, count=length // dtype.itemsize,
                                offset=offset - aligned)  # fmt: skip
        return flat.view(hi - lo, *shape[1:])


def _owned(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A tensor of its own memory (a slice read may still view the mapped file)."""
    out = t.to(dtype) if dtype is not None else t
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def _unset_value(dtype: torch.dtype) -> float | int:
    """A value no initialiser writes: NaN, or -128 for integers (a bool cannot tell)."""
    return float("nan") if dtype.is_floating_point else 0 if dtype == torch.bool else -(2**7)


def _unset_like(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of `t`'s shape and dtype holding the unset value, for the model's
    initialiser to overwrite (see `_left_unset`)."""
    return torch.full(t.shape, _unset_value(t.dtype), dtype=t.dtype)


def _left_unset(t: torch.Tensor) -> bool:
    """Whether an initialiser left any of `_unset_like`'s values in `t`."""
    if t.dtype == torch.bool:
        return False
    return bool((t.isnan() if t.is_floating_point() else t == _unset_value(t.dtype)).any())


def fill_buffers(model: torch.nn.Module, weights: Weights) -> None:
    """Give `model`'s buffers on the meta device that `weights` lacks (save_pretrained does
    not store non-persistent ones, e.g. rotary inverse frequencies) their values from the
    model's own initialiser (transformers' `_init_weights(module)`), on the CPU. Modifies
    `model`: call it on a model of your own (a copy, or one built for this)."""
    init = getattr(model, "_init_weights", None)
    unsaved = unsaved_buffers(model)
    for name, b in model.named_buffers():
        if not b.is_meta or (name not in unsaved and name in weights):
            continue
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner)
        if init is None:
            raise AutoTPError(
                f"buffer {name} is not in {weights.path} and the model on the meta device "
                "holds no value for it",
                hint="build the model with real buffers (only "
                "its parameters on the meta device), or save the buffer with the weights",
            )
        mod._buffers[leaf] = _unset_like(b)
        init(mod)  # what its __init__ computed (rotary frequencies)
        if _left_unset(cast(torch.Tensor, mod._buffers[leaf])):  # set above, filled in place
            raise AutoTPError(
                f"buffer {name} is not in {weights.path}, and the model's initialiser "
                f"({type(model).__name__}._init_weights) does not compute it",
                hint="build the model with real buffers (only its parameters on the meta device)",
            )


def unsaved_buffers(model: torch.nn.Module) -> set[str]:
    """The names of `model`'s non-persistent buffers: in no saved file, so never looked
    for in one."""
    return {
        f"{path}.{leaf}" if path else leaf
        for path, mod in model.named_modules(remove_duplicate=False)
        for leaf in mod._non_persistent_buffers_set
    }


def init_missing(model: torch.nn.Module, weights: Weights, skip: tuple[str, ...]) -> list[str]:
    """Give `model`'s parameters on the meta device that `weights` lacks (a task head over
    a base model's checkpoint: a classifier, a pooler) the values transformers'
    `from_pretrained` gives them: the model's own `_init_weights(module)`, on the CPU,
    module by module. Parameters under `skip` are left. Returns the names initialised;
    without an initialiser, or where it leaves a value unset, refuses."""
    init = getattr(model, "_init_weights", None)
    names = names_by_tensor(model, buffers=False)
    owners: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.is_meta and not name.startswith(skip) and weights.find(names[id(p)]) is None:
            owner, _, leaf = name.rpartition(".")
            owners.setdefault(owner, []).append(leaf)
    done = []
    for owner, leaves in owners.items():
        mod = model.get_submodule(owner)
        if init is None:
            raise weights.missing(f"{owner}.{leaves[0]}")
        for leaf in leaves:
            old = mod._parameters[leaf]
            assert old is not None  # named_parameters gave it
            mod._parameters[leaf] = torch.nn.Parameter(_unset_like(old), old.requires_grad)
        for name, t in mod.named_parameters(recurse=False):  # the others: not theirs to set
            if t.is_meta:
                mod._parameters[name] = torch.nn.Parameter(
                    torch.empty(t.shape, dtype=t.dtype), requires_grad=t.requires_grad
                )
        with torch.no_grad():
            init(mod)
        for leaf in leaves:
            if _left_unset(cast(torch.Tensor, mod._parameters[leaf])):  # set above
                raise AutoTPError(
                    f"{owner}.{leaf} is not in {weights.path}, and the model's initialiser "
                    f"({type(model).__name__}._init_weights) does not set it",
                    hint=""
                    "pass weights= a checkpoint holding it, or build the model with real "
                    "tensors",
                )
            done.append(f"{owner}.{leaf}")
    return done
