"""A parallel module's state_dict under torch.distributed.checkpoint (DCP).

Every rank's state_dict holds its shard of a split tensor under the serial name. Plain
tensors of one name on several ranks are, to DCP, one replicated tensor: it would write
rank 0's shard alone and load it on every rank. So in the state_dict of a module from
`parallelize` each split tensor is a `ShardState`: the same memory, which tells DCP (by
the protocol DTensor implements: `__create_write_items__`, `__create_chunk_list__`,
`__get_tensor_shard__`) which chunks of the serial tensor this rank holds. Then
`dcp.save(module.state_dict(), ...)` writes the serial tensors, each rank its chunks, and
`dcp.load` into a parallel module's state_dict (any tp) or a serial model's reads them
back. Every other use of a ShardState is a plain tensor's, but for `size()`, which is
the serial tensor's, as DTensor's is (`.shape` is this rank's); torch.save writes it as
a plain tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from torch._C import DisableTorchFunctionSubclass

from ..sharding import Shard
from ..sharding.placement import cut

__all__ = ["ShardState", "as_shard_state", "shard_states"]


class ShardState(torch.Tensor):
    """A rank's shard in a state_dict: its chunks of the serial tensor for DCP."""

    _autotp_dim: int
    _autotp_size: torch.Size  # the serial tensor's shape
    _autotp_chunks: tuple[tuple[int, int, int], ...]  # (local start, serial start, length)

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        with DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def size(self, dim: int | None = None) -> Any:
        """The serial tensor's size, as DTensor's (DCP checks it against the saved one);
        `.shape` stays this rank's."""
        return self._autotp_size if dim is None else self._autotp_size[dim]

    def __reduce_ex__(self, protocol: Any) -> Any:  # torch.save: a plain tensor
        # torch leaves Tensor.__reduce_ex__ unannotated
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)  # type: ignore[no-untyped-call]

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardState:  # a snapshot DCP still reads right
        out = self.as_subclass(torch.Tensor).clone().as_subclass(ShardState)
        out._autotp_dim, out._autotp_size = self._autotp_dim, self._autotp_size
        out._autotp_chunks = self._autotp_chunks
        memo[id(self)] = out
        return out

    def _chunk(self, local: int, serial: int, length: int) -> tuple[torch.Size, torch.Size]:
        offsets, sizes = [0] * self.dim(), list(self.shape)
        offsets[self._autotp_dim], sizes[self._autotp_dim] = serial, length
        return torch.Size(offsets), torch.Size(sizes)

    def _piece(self, local: int, length: int) -> torch.Tensor:
        with DisableTorchFunctionSubclass():
            return self.narrow(self._autotp_dim, local, length)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[Any]:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import (
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        items = []
        for local, serial, length in self._autotp_chunks:
            offsets, sizes = self._chunk(local, serial, length)
            properties = TensorProperties.create_from_tensor(self._piece(local, length))
            items.append(WriteItem(
                index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                    properties=properties, size=self._autotp_size,
                ),
            ))  # fmt: skip
        return items

    def __create_chunk_list__(self) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [
            ChunkStorageMetadata(*self._chunk(local, serial, length))
            for local, serial, length in self._autotp_chunks
        ]

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        for local, serial, length in self._autotp_chunks:
            if self._chunk(local, serial, length)[0] == torch.Size(index.offset):
                return self._piece(local, length)
        raise ValueError(f"{index.fqn}: this rank holds no chunk at {index.offset}")


def as_shard_state(
    t: torch.Tensor, spec: Shard, rank: int, tp: int, serial: torch.Size
) -> ShardState:
    """`t`, this rank's shard of a serial tensor of shape `serial` cut by `spec`, as a
    ShardState. Its chunks are found by cutting the serial positions as the tensor was
    cut (parts, sections, replicas and padding alike); padded rows are in no chunk."""
    positions = torch.arange(1, serial[spec.dim] + 1)  # 0: a padded row
    mine = _cut_positions(positions, replace(spec, dim=0), rank, tp).tolist()
    chunks: list[list[int]] = []
    for local, p in enumerate(mine):
        if p == 0:
            continue
        if (
            chunks
            and chunks[-1][0] + chunks[-1][2] == local
            and chunks[-1][1] + chunks[-1][2] == p - 1
        ):
            chunks[-1][2] += 1
        else:
            chunks.append([local, p - 1, 1])
    out = t.detach().as_subclass(ShardState)
    out._autotp_dim = spec.dim
    out._autotp_size = torch.Size(serial)
    out._autotp_chunks = tuple(tuple(c) for c in chunks)  # type: ignore[misc]
    return out


def _cut_positions(positions: torch.Tensor, spec: Shard, rank: int, tp: int) -> torch.Tensor:
    return cut(positions, spec, rank, tp)


def shard_states(
    module: nn.Module, splits: dict[str, Shard], shapes: dict[str, torch.Size],
    rank: int, tp: int,
) -> None:  # fmt: skip
    """Make `module.state_dict()` give its split tensors (by name in the module, with
    their serial shapes) as ShardStates. `state_dict(keep_vars=True)` keeps Parameters."""

    def hook(m: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name, spec in splits.items():
            value = state.get(prefix + name)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                if name in shapes and not isinstance(value, ShardState):
                    state[prefix + name] = as_shard_state(value, spec, rank, tp, shapes[name])

    # unannotated in torch
    module.register_state_dict_post_hook(hook)  # type: ignore[no-untyped-call]
