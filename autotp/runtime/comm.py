"""What the rewritten graph needs from a process group: a communicator (`Comm`) for a real
group (gloo or NCCL), for tp=1 and for `simulate`'s placeholder ranks, and the record of
every collective that runs (`count_collectives`).

The rank module compiles: under torch.compile each collective on a process group is a
custom op (`torch.ops.autotp.all_reduce`, ...; the group passed by name), which dynamo
keeps in its graph instead of breaking the graph there; eager code calls
torch.distributed itself, which PyTorch's CommDebugMode counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _resolve_process_group
from torch.distributed.distributed_c10d import GroupName

from ..common.errors import AutoTPError

__all__ = [
    "Comm", "ProcessGroupComm", "LocalComm", "SimulatedComm", "CollectiveLog",
    "count_collectives", "record_collective", "check_divisible", "chunk",
]  # fmt: skip


@dataclass
class CollectiveLog:
    """Collectives that ran: (kind, direction, elements) per call, where kind is
    "all_reduce" (sum), "all_reduce_max", "all_gather" or "reduce_scatter", and elements
    counts the tensor each rank hands in (for an all-gather its own chunk, for a
    reduce-scatter the whole tensor it reduces)."""

    events: list[tuple[str, str, int]] = field(default_factory=list)

    def _select(self, direction: str | None, kind: str | None) -> list[tuple[str, str, int]]:
        return [
            e
            for e in self.events
            if (direction is None or e[1] == direction) and (kind is None or e[0] == kind)
        ]

    def count(self, direction: str | None = None, kind: str | None = None) -> int:
        return len(self._select(direction, kind))

    def elements(self, direction: str | None = None, kind: str | None = None) -> int:
        return sum(e[2] for e in self._select(direction, kind))


_LOGS: list[CollectiveLog] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Record every autotp collective that runs inside its `with` (forward and backward).

    Compiled modules record too: the custom op a compiled graph calls runs the same
    Python that records."""
    log = CollectiveLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def record_collective(direction: str, t: torch.Tensor, kind: str = "all_reduce") -> None:
    for log in _LOGS:
        log.events.append((kind, direction, t.numel()))


class Comm:
    """What the rewritten graph needs from a process group."""

    size: int = 1
    rank: int = 0

    def all_reduce(
        self, t: torch.Tensor, direction: str, op: str = "sum", *, inplace: bool = False
    ) -> torch.Tensor:
        """The reduction of `t` over the group: a new tensor, or `t` itself reduced in
        place when `inplace` (the caller owns `t`: nothing else reads it)."""
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor, direction: str) -> list[torch.Tensor]:
        """Every rank's `t`, in rank order."""
        raise NotImplementedError

    def all_gather_dim(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        """The ranks' `t` concatenated along `dim` in rank order (equal shapes)."""
        raise NotImplementedError

    def reduce_scatter(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        """This rank's chunk along `dim` of the sum over ranks of `t` (the size of `dim`
        a multiple of the group size)."""
        raise NotImplementedError


def check_divisible(t: torch.Tensor, dim: int, tp: int) -> None:
    """Refuse to cut a sequence that tp ranks cannot share equally. Under torch.compile
    (dynamo cannot build the error) the refusal breaks the graph, and raises there; with
    fullgraph=True dynamo reports the break instead, with the reason."""
    if t.shape[dim] % tp:
        _refuse_indivisible(tuple(t.shape), dim, tp)


# torch leaves torch.compiler.disable unannotated
@torch.compiler.disable(reason="sequence parallelism: the sequence length is not a multiple of tp")  # type: ignore[misc, no-untyped-call]
def _refuse_indivisible(shape: tuple[int, ...], dim: int, tp: int) -> None:
    raise AutoTPError(
        f"cannot split dimension {dim} of a tensor of shape {shape} into tp={tp} equal "
        f"chunks: with sequence parallelism the sequence length must be a multiple of tp",
        hint=f"pad the input's sequence length to a multiple of {tp}",
    )


def chunk(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s chunk of `t` cut into tp equal parts along `dim`."""
    check_divisible(t, dim, tp)
    local = t.shape[dim] // tp
    return t.narrow(dim, rank * local, local).contiguous()


class LocalComm(Comm):
    """tp = 1: nothing to communicate."""

    def all_reduce(
        self, t: torch.Tensor, direction: str, op: str = "sum", *, inplace: bool = False
    ) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, direction: str) -> list[torch.Tensor]:
        return [t]

    def all_gather_dim(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        return t

    def reduce_scatter(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        return t


class ProcessGroupComm(Comm):
    """A torch.distributed process group (gloo or NCCL).

    Eagerly each method calls torch.distributed (what CommDebugMode counts); under
    torch.compile it calls the same code as a custom op (`torch.ops.autotp.*`, the group
    passed by name), which dynamo puts in the graph instead of breaking it there."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        world = group if group is not None else dist.group.WORLD
        assert world is not None  # get_world_size raised above without a default group
        self.group_name = world.group_name

    def all_reduce(
        self, t: torch.Tensor, direction: str, op: str = "sum", *, inplace: bool = False
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a custom op returns a new tensor
            reduced: torch.Tensor = torch.ops.autotp.all_reduce(t, self.group_name, direction, op)
            return reduced
        return _all_reduce(t, self.group, direction, op, inplace)

    def all_gather(self, t: torch.Tensor, direction: str) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            parts: list[torch.Tensor] = torch.ops.autotp.all_gather(t, self.group_name, direction)
            return parts
        return _all_gather(t, self.group, direction)

    # The single-tensor collectives cut and join along dimension 0: `dim` is moved there
    # (a copy unless it already is the outermost) and back (a view).

    def all_gather_dim(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        src = t.movedim(dim, 0).contiguous()
        out: torch.Tensor
        if torch.compiler.is_compiling():
            out = torch.ops.autotp.all_gather_single(src, self.group_name, direction)
        else:
            out = _all_gather_single(src, self.group, direction)
        return out.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        check_divisible(t, dim, self.size)
        src = t.movedim(dim, 0).contiguous()
        out: torch.Tensor
        if torch.compiler.is_compiling():
            out = torch.ops.autotp.reduce_scatter_single(src, self.group_name, direction)
        else:
            out = _reduce_scatter_single(src, self.group, direction)
        return out.movedim(0, dim)


# -- the collectives on a process group, eager, and as custom ops for torch.compile ---------


def _all_reduce(
    t: torch.Tensor, group: dist.ProcessGroup | None, direction: str, op: str, inplace: bool
) -> torch.Tensor:
    out = t.contiguous()  # a copy already when t is not contiguous
    if out is t and not inplace:
        out = t.clone()
    record_collective(direction, out, "all_reduce" if op == "sum" else "all_reduce_max")
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    dist.all_reduce(out, op=reduce_op, group=group)
    return out


def _all_gather(
    t: torch.Tensor, group: dist.ProcessGroup | None, direction: str
) -> list[torch.Tensor]:
    t = t.contiguous()
    record_collective(direction, t, "all_gather")
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _all_gather_single(
    src: torch.Tensor, group: dist.ProcessGroup | None, direction: str
) -> torch.Tensor:
    src = src.contiguous()
    record_collective(direction, src, "all_gather")
    out = src.new_empty((src.shape[0] * dist.get_world_size(group), *src.shape[1:]))
    dist.all_gather_single(out, src, group=group)
    return out


def _reduce_scatter_single(
    src: torch.Tensor, group: dist.ProcessGroup | None, direction: str
) -> torch.Tensor:
    src = src.contiguous()
    record_collective(direction, src, "reduce_scatter")
    out = src.new_empty((src.shape[0] // dist.get_world_size(group), *src.shape[1:]))
    dist.reduce_scatter_single(out, src, group=group)
    return out


def _group(name: str) -> dist.ProcessGroup:
    return _resolve_process_group(GroupName(name))


@torch.library.custom_op("autotp::all_reduce", mutates_args=())
def _all_reduce_op(t: torch.Tensor, group: str, direction: str, op: str) -> torch.Tensor:
    return _all_reduce(t, _group(group), direction, op, inplace=False)


@_all_reduce_op.register_fake
def _(t: torch.Tensor, group: str, direction: str, op: str) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("autotp::all_gather", mutates_args=())
def _all_gather_op(t: torch.Tensor, group: str, direction: str) -> list[torch.Tensor]:
    return _all_gather(t, _group(group), direction)


@_all_gather_op.register_fake
def _(t: torch.Tensor, group: str, direction: str) -> list[torch.Tensor]:
    size = dist.get_world_size(_group(group))
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(size)]


@torch.library.custom_op("autotp::all_gather_single", mutates_args=())
def _all_gather_single_op(src: torch.Tensor, group: str, direction: str) -> torch.Tensor:
    return _all_gather_single(src, _group(group), direction)


@_all_gather_single_op.register_fake
def _(src: torch.Tensor, group: str, direction: str) -> torch.Tensor:
    size = dist.get_world_size(_group(group))
    return src.new_empty((src.shape[0] * size, *src.shape[1:]))


@torch.library.custom_op("autotp::reduce_scatter_single", mutates_args=())
def _reduce_scatter_single_op(src: torch.Tensor, group: str, direction: str) -> torch.Tensor:
    return _reduce_scatter_single(src, _group(group), direction)


@_reduce_scatter_single_op.register_fake
def _(src: torch.Tensor, group: str, direction: str) -> torch.Tensor:
    size = dist.get_world_size(_group(group))
    return src.new_empty((src.shape[0] // size, *src.shape[1:]))


class SimulatedComm(Comm):
    """Placeholder inside `simulate`: its collective nodes are run by the simulator."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def all_reduce(self, t: torch.Tensor, direction: str, *args: Any, **kw: Any) -> torch.Tensor:
        raise RuntimeError("a simulated rank module cannot run alone; call the simulate module")

    all_gather = all_gather_dim = reduce_scatter = all_reduce  # type: ignore[assignment]
