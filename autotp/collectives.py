"""The two conjugate operators of Megatron-LM, as autograd Functions over a communicator.

    f: forward identity,  backward all-reduce   (before a column-split block)
    g: forward all-reduce, backward identity    (after a row-split block)

and, for sequence parallelism (activations outside the split blocks cut along the sequence
dimension), the three that replace them around a block, each over a dimension `dim`:

    ScatterToSP:        forward keep own chunk,  backward all-gather
    GatherFromSP:       forward all-gather,      backward reduce-scatter   (f's place)
    ReduceScatterToSP:  forward reduce-scatter,  backward all-gather       (g's place)

plus CopyManyToTP, an f over several tensors whose gradients are all-reduced as one flat
buffer (the parameters read in sequence-parallel regions, such as layer norms).

`torch.distributed.nn.functional.all_reduce` cannot serve as g: its backward all-reduces
too, multiplying gradients by tp. In the rewritten graph f and g are submodules under
`tp_f` and `tp_g`, one per call site (tools that track modules, such as CommDebugMode,
expect a module to run once per forward); `simulate` runs the same graph with all ranks in
one process and replaces them by the in-process versions below.

Every collective that runs is recorded by `count_collectives()`, so tests count the
collectives that actually ran in forward and backward.

The rank module compiles: under torch.compile each collective on a process group is a
custom op (`torch.ops.autotp.all_reduce`, ...; the group passed by name), which dynamo
keeps in its graph instead of breaking the graph there, and the f and g above trace as
autograd Functions around it (g then never reduces in place).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.distributed_c10d import _resolve_process_group

from .errors import AutoTPError

__all__ = [
    "Comm", "ProcessGroupComm", "LocalComm", "CopyToTP", "ReduceFromTP", "ReduceMaxTP",
    "GatherFromTP", "ScatterToSP", "GatherFromSP", "ReduceScatterToSP", "CopyManyToTP",
    "CollectiveLog", "count_collectives", "simulated_f", "simulated_g", "simulated_max",
    "simulated_gather", "simulated_scatter_to_sp", "simulated_gather_from_sp",
    "simulated_reduce_scatter_to_sp", "simulated_copy_many",
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
    """Record every autotp collective that runs inside the block (forward and backward).

    Compiled modules record too: the custom op a compiled graph calls runs the same
    Python that records."""
    log = CollectiveLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(direction: str, t: torch.Tensor, kind: str = "all_reduce") -> None:
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


@torch.compiler.disable(reason="sequence parallelism: the sequence length is not a multiple of tp")
def _refuse_indivisible(shape: tuple[int, ...], dim: int, tp: int) -> None:
    raise AutoTPError(
        f"cannot split dimension {dim} of a tensor of shape {shape} into tp={tp} equal "
        f"chunks: with sequence parallelism the sequence length must be a multiple of tp",
        hint=f"pad the input's sequence length to a multiple of {tp}",
    )


def _chunk(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
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
        self.group_name = (group if group is not None else dist.group.WORLD).group_name

    def all_reduce(
        self, t: torch.Tensor, direction: str, op: str = "sum", *, inplace: bool = False
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a custom op returns a new tensor
            return torch.ops.autotp.all_reduce(t, self.group_name, direction, op)
        return _all_reduce(t, self.group, direction, op, inplace)

    def all_gather(self, t: torch.Tensor, direction: str) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            return torch.ops.autotp.all_gather(t, self.group_name, direction)
        return _all_gather(t, self.group, direction)

    # The single-tensor collectives cut and join along dimension 0: `dim` is moved there
    # (a copy unless it already is the outermost) and back (a view).

    def all_gather_dim(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        src = t.movedim(dim, 0).contiguous()
        if torch.compiler.is_compiling():
            out = torch.ops.autotp.all_gather_single(src, self.group_name, direction)
        else:
            out = _all_gather_single(src, self.group, direction)
        return out.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int, direction: str) -> torch.Tensor:
        check_divisible(t, dim, self.size)
        src = t.movedim(dim, 0).contiguous()
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
    _record(direction, out, "all_reduce" if op == "sum" else "all_reduce_max")
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    dist.all_reduce(out, op=reduce_op, group=group)
    return out


def _all_gather(
    t: torch.Tensor, group: dist.ProcessGroup | None, direction: str
) -> list[torch.Tensor]:
    t = t.contiguous()
    _record(direction, t, "all_gather")
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _all_gather_single(
    src: torch.Tensor, group: dist.ProcessGroup | None, direction: str
) -> torch.Tensor:
    src = src.contiguous()
    _record(direction, src, "all_gather")
    out = src.new_empty((src.shape[0] * dist.get_world_size(group), *src.shape[1:]))
    dist.all_gather_single(out, src, group=group)
    return out


def _reduce_scatter_single(
    src: torch.Tensor, group: dist.ProcessGroup | None, direction: str
) -> torch.Tensor:
    src = src.contiguous()
    _record(direction, src, "reduce_scatter")
    out = src.new_empty((src.shape[0] // dist.get_world_size(group), *src.shape[1:]))
    dist.reduce_scatter_single(out, src, group=group)
    return out


def _group(name: str) -> dist.ProcessGroup:
    return _resolve_process_group(name)


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


class _F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.comm.all_reduce(grad, "backward"), None


class _G(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        out = comm.all_reduce(x, "forward", inplace=inplace)
        if out is x:
            ctx.mark_dirty(x)  # autograd refuses, loudly, if anything saved x for backward
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, dim: int, size: int):  # type: ignore[override]
        ctx.comm, ctx.dim, ctx.local = comm, dim, x.shape[dim]
        return torch.cat(comm.all_gather(x, "forward"), dim=dim).narrow(dim, 0, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _own_slice(grad, ctx.dim, ctx.local, ctx.comm.rank), None, None, None


class _ScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.dim = comm, dim
        return _chunk(x, dim, comm.size, comm.rank)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.comm.all_gather_dim(grad, ctx.dim, "backward"), None, None


class _GatherSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather_dim(x, dim, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.comm.reduce_scatter(grad, ctx.dim, "backward"), None, None


class _ReduceScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.comm.all_gather_dim(grad, ctx.dim, "backward"), None, None


class _FMany(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Comm, *xs: torch.Tensor):  # type: ignore[override]
        ctx.comm = comm
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        flat = ctx.comm.all_reduce(_flatten(grads), "backward", inplace=True)
        return (None, *_unflatten(flat, grads))


def _flatten(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One flat buffer holding `ts` (of one dtype) end to end."""
    if any(t.dtype != ts[0].dtype for t in ts):
        raise AutoTPError(
            f"the tensors of one CopyManyToTP have dtypes {[str(t.dtype) for t in ts]}: "
            "their gradients are all-reduced as one buffer",
            hint="give the model one dtype (model.to(dtype))",
        )
    return torch.cat([t.reshape(-1) for t in ts])


def _unflatten(flat: torch.Tensor, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    return [p.view_as(t) for p, t in zip(flat.split(sizes), like, strict=True)]


def rank_slice(
    x: torch.Tensor, dim: int, blocks: int, tp: int, rank: torch.Tensor,
    padded: int | None = None, replicas: int = 1,
) -> torch.Tensor:  # fmt: skip
    """This rank's slice of a replicated tensor, split as S(dim x blocks): the
    Replicate -> Shard redistribution, with no communication (its gradient fills the
    slice, zeros elsewhere, which is why the replicated value also gets f). `padded`: the
    dimension is first padded with zeros to that size (a bias over a padded vocabulary).
    `replicas`: the dimension holds tp / replicas slices, ranks r*replicas ... share one
    (a key/value head read by the query heads of several ranks)."""
    if padded is not None and padded > x.shape[dim]:
        pad = list(x.shape)
        pad[dim] = padded - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    size, slices = x.shape[dim], tp // replicas
    parts = x.unflatten(dim, (blocks, slices, size // (blocks * slices)))
    which = (rank.reshape(1) // replicas).to(torch.long)
    mine = parts.index_select(dim + 1, which).squeeze(dim + 1)
    return mine.flatten(dim, dim + 1)


def _own_slice(grad: torch.Tensor, dim: int, local: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a gathered (and unpadded) gradient, zero-padded back."""
    start = min(rank * local, grad.shape[dim])  # a rank may hold only padding
    stop = min(rank * local + local, grad.shape[dim])
    part = grad.narrow(dim, start, stop - start)
    if part.shape[dim] == local:
        return part.contiguous()
    pad = list(grad.shape)
    pad[dim] = local - part.shape[dim]
    return torch.cat([part, grad.new_zeros(pad)], dim=dim)


class CopyToTP(nn.Module):
    """f: identity forward, all-reduce of the gradient backward."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.comm.size == 1 else _F.apply(x, self.comm)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class ReduceFromTP(nn.Module):
    """g: all-reduce (sum) forward, identity backward. `inplace=True` (set by the rewrite
    where x is a fresh partial sum that only g reads) reduces x in place, saving a copy."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.comm.size == 1:
            return x
        # In place only on a tensor that owns its memory: a module hook (e.g. the full
        # backward hooks CommDebugMode installs) hands forward a view of the partial sum,
        # and autograd forbids modifying such a view in place.
        # Under torch.compile never in place: the collective is then a custom op, which
        # returns a new tensor.
        inplace = inplace and not torch.compiler.is_compiling() and not x._is_view()
        return _G.apply(x, self.comm, inplace)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class ReduceMaxTP(nn.Module):
    """All-reduce max (forward only; for the row max of the vocab-parallel loss)."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.comm.size == 1 else self.comm.all_reduce(x.detach(), "forward", "max")


class GatherFromTP(nn.Module):
    """All-gather along `dim`, trimmed to the serial `size` (vocabulary padding);
    backward keeps this rank's slice of the gradient."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        if self.comm.size == 1:
            return x.narrow(dim, 0, size)
        return _Gather.apply(x, self.comm, dim, size)


class ScatterToSP(nn.Module):
    """Sequence parallelism: keep this rank's chunk along `dim` (no communication);
    backward all-gathers the gradient along `dim`."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.comm.size == 1 else _ScatterSP.apply(x, self.comm, dim)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class GatherFromSP(nn.Module):
    """Sequence parallelism, in f's place before a column-split block: all-gather along
    `dim` (the ranks' chunks in rank order); backward reduce-scatters the gradient."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.comm.size == 1 else _GatherSP.apply(x, self.comm, dim)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class ReduceScatterToSP(nn.Module):
    """Sequence parallelism, in g's place after a row-split block: reduce-scatter (sum)
    along `dim`; backward all-gathers the gradient."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.comm.size == 1 else _ReduceScatterSP.apply(x, self.comm, dim)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class CopyManyToTP(nn.Module):
    """f over several tensors at once: identity forward; backward all-reduces all their
    gradients as one flat buffer (Megatron's single all-reduce of the gradients of the
    parameters read in sequence-parallel regions). Returns a tuple."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(xs) if self.comm.size == 1 else _FMany.apply(self.comm, *xs)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


# -- in-process versions over all ranks at once (for simulate) ------------------------------


def _sum(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    total = ts[0].clone()
    for t in ts[1:]:
        total = total + t
    return total


class _SimF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs: torch.Tensor):  # type: ignore[override]
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        _record("backward", grads[0])
        total = _sum(grads)
        return tuple(total.clone() for _ in grads)


class _SimG(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs: torch.Tensor):  # type: ignore[override]
        _record("forward", xs[0])
        total = _sum(xs)
        return tuple(total.clone() for _ in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        return grads


class _SimGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, size: int, *xs: torch.Tensor):  # type: ignore[override]
        _record("forward", xs[0], "all_gather")
        ctx.dim, ctx.local = dim, xs[0].shape[dim]
        full = torch.cat(xs, dim=dim).narrow(dim, 0, size)
        return tuple(full.clone() for _ in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        own = [_own_slice(g, ctx.dim, ctx.local, r) for r, g in enumerate(grads)]
        return (None, None, *own)


def simulated_max(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-reduce max over all ranks (no gradient)."""
    if len(xs) == 1:
        return xs
    _record("forward", xs[0], "all_reduce_max")
    top = torch.stack([x.detach() for x in xs]).amax(dim=0)
    return [top.clone() for _ in xs]


def simulated_gather(xs: list[torch.Tensor], dim: int, size: int) -> list[torch.Tensor]:
    """All-gather along `dim` over all ranks, trimmed to `size`."""
    if len(xs) == 1:
        return [xs[0].narrow(dim, 0, size)]
    return list(_SimGather.apply(dim, size, *xs))


def simulated_f(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """f over all ranks: each keeps its value; backward sums the ranks' gradients."""
    return list(_SimF.apply(*xs)) if len(xs) > 1 else xs


def simulated_g(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """g over all ranks: each gets the sum; backward passes each rank its own gradient."""
    return list(_SimG.apply(*xs)) if len(xs) > 1 else xs


class _SimScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, *xs: torch.Tensor):  # type: ignore[override]
        ctx.dim = dim
        return tuple(_chunk(x, dim, len(xs), r) for r, x in enumerate(xs))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        return (None, *_sim_all_gather(grads, ctx.dim, "backward"))


class _SimGatherSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, *xs: torch.Tensor):  # type: ignore[override]
        ctx.dim = dim
        return tuple(_sim_all_gather(xs, dim, "forward"))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        return (None, *_sim_reduce_scatter(grads, ctx.dim, "backward"))


class _SimReduceScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, *xs: torch.Tensor):  # type: ignore[override]
        ctx.dim = dim
        return tuple(_sim_reduce_scatter(xs, dim, "forward"))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        return (None, *_sim_all_gather(grads, ctx.dim, "backward"))


class _SimFMany(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n: int, *xs: torch.Tensor):  # type: ignore[override]
        ctx.n = n  # xs: rank 0's n tensors, then rank 1's, ...
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        per_rank = [grads[i : i + ctx.n] for i in range(0, len(grads), ctx.n)]
        flats = [_flatten(g) for g in per_rank]
        _record("backward", flats[0])
        total = _sum(tuple(flats))
        return (None, *[g for rank in per_rank for g in _unflatten(total.clone(), rank)])


def _sim_all_gather(xs: tuple[torch.Tensor, ...], dim: int, direction: str) -> list[torch.Tensor]:
    _record(direction, xs[0], "all_gather")
    full = torch.cat(xs, dim=dim)
    return [full.clone() for _ in xs]


def _sim_reduce_scatter(
    xs: tuple[torch.Tensor, ...], dim: int, direction: str
) -> list[torch.Tensor]:
    check_divisible(xs[0], dim, len(xs))
    _record(direction, xs[0], "reduce_scatter")
    total = _sum(xs)
    return [_chunk(total, dim, len(xs), r) for r in range(len(xs))]


def simulated_scatter_to_sp(xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """ScatterToSP over all ranks: rank r keeps chunk r of its value along `dim`;
    backward all-gathers the ranks' gradient chunks."""
    return list(_SimScatterSP.apply(dim, *xs)) if len(xs) > 1 else xs


def simulated_gather_from_sp(xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """GatherFromSP over all ranks: each gets the chunks joined along `dim`; backward
    hands rank r chunk r of the sum of the ranks' gradients."""
    return list(_SimGatherSP.apply(dim, *xs)) if len(xs) > 1 else xs


def simulated_reduce_scatter_to_sp(xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """ReduceScatterToSP over all ranks: rank r gets chunk r of the sum along `dim`;
    backward all-gathers the ranks' gradient chunks."""
    return list(_SimReduceScatterSP.apply(dim, *xs)) if len(xs) > 1 else xs


def simulated_copy_many(
    xs: list[tuple[torch.Tensor, ...]],
) -> list[tuple[torch.Tensor, ...]]:
    """CopyManyToTP over all ranks, `xs[r]` rank r's tensors: each keeps its values;
    backward sums the ranks' gradients, recorded as one all-reduce of them all."""
    if len(xs) == 1:
        return [tuple(xs[0])]
    n = len(xs[0])
    ys = _SimFMany.apply(n, *[x for rank in xs for x in rank])
    return [tuple(ys[i : i + n]) for i in range(0, len(ys), n)]
