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
import weakref
from collections.abc import Callable
from typing import Any, TypeAlias

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..common.errors import AutoTPError
from .comm import (
    CollectiveLog,
    Comm,
    LocalComm,
    ProcessGroupComm,
    check_divisible,
    chunk,
    count_collectives,
    record_collective,
)

__all__ = [
    "Comm", "ProcessGroupComm", "LocalComm", "CopyToTP", "ReduceFromTP", "ReduceMaxTP",
    "GatherFromTP", "ScatterToSP", "GatherFromSP", "ReduceScatterToSP", "CopyManyToTP",
    "CollectiveLog", "count_collectives", "simulated_f", "simulated_g", "simulated_max",
    "simulated_gather", "simulated_scatter_to_sp", "simulated_gather_from_sp",
    "simulated_reduce_scatter_to_sp", "simulated_copy_many", "Held",
]  # fmt: skip


# `fn.apply(*args)` of an autograd Function of one output, and of several: torch leaves
# `Function.apply` unannotated.


def _apply_one(fn: type[torch.autograd.Function], *args: Any) -> torch.Tensor:
    out: torch.Tensor = fn.apply(*args)  # type: ignore[no-untyped-call]
    return out


def _apply_many(fn: type[torch.autograd.Function], *args: Any) -> tuple[torch.Tensor, ...]:
    out: tuple[torch.Tensor, ...] = fn.apply(*args)  # type: ignore[no-untyped-call]
    return out


# torch types `Function.backward` as (ctx, *grad_outputs): a backward below that takes its
# gradients by name overrides it with `type: ignore[override]`.


class _F(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.comm.all_reduce(grad, "backward"), None


class _G(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm, inplace: bool) -> torch.Tensor:
        out = comm.all_reduce(x, "forward", inplace=inplace)
        if out is x:
            ctx.mark_dirty(x)  # autograd refuses, loudly, if anything saved x for backward
        return out

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm, dim: int, size: int) -> torch.Tensor:
        ctx.comm, ctx.dim, ctx.local = comm, dim, x.shape[dim]
        return torch.cat(comm.all_gather(x, "forward"), dim=dim).narrow(dim, 0, size)

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return _own_slice(grad, ctx.dim, ctx.local, ctx.comm.rank), None, None, None


class _ScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return chunk(x, dim, comm.size, comm.rank)

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.comm.all_gather_dim(grad, ctx.dim, "backward"), None, None


class _GatherSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        out = comm.all_gather_dim(x, dim, "forward")
        if isinstance(comm, ProcessGroupComm) and not torch.compiler.is_compiling():
            out = out.contiguous()  # the layout the linears' saved views refer to
            part = x.detach()
            _remember([out], part, lambda: comm.all_gather_dim(part, dim, "backward"))
        return out

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.comm.reduce_scatter(grad, ctx.dim, "backward"), None, None


# Megatron-LM's sequence parallelism keeps, for backward, the rank's part of the sequence
# a column-split linear reads, not the gathered whole (tp times its size), and gathers it
# again in backward. The gathered tensors alive now, by storage: while `keep_parts()` is
# active, autograd saves a view of one of them as the rank's part, re-gathered on use.
_GATHERED: dict[int, tuple[_Regather, int]] = {}  # storage -> (entry, its version then)


class _Regather:
    """A gathered sequence autograd would save: its rank's part, gathered again once for
    all the views saved of it (of every rank's copy, in simulate), and dropped when the
    last of them has been used."""

    def __init__(self, part: torch.Tensor, gather: Callable[[], torch.Tensor]) -> None:
        self.part, self.gather = part, gather
        self.saved, self.used = 0, 0
        self.whole: torch.Tensor | None = None

    def view(
        self, size: torch.Size, stride: tuple[int, ...], offset: int | torch.SymInt
    ) -> torch.Tensor:
        if self.whole is None:
            self.whole = self.gather().contiguous()
        out = self.whole.as_strided(size, stride, offset)
        self.used += 1
        if self.used >= self.saved:
            self.whole = None  # a second backward (retain_graph) gathers again
        return out


# what autograd saves of a view of a gathered sequence: its entry, the view's size, stride
# and offset
_Kept = tuple[_Regather, torch.Size, tuple[int, ...], int | torch.SymInt]


def _remember(
    outs: list[torch.Tensor], part: torch.Tensor, gather: Callable[[], torch.Tensor]
) -> None:
    """Register the gathered `outs` (contiguous; every rank's, in simulate), for as long
    as they live, as kept by `part` and made again by `gather`."""
    entry = _Regather(part, gather)
    for out in outs:
        key = out.untyped_storage().data_ptr()
        _GATHERED[key] = (entry, out._version)
        weakref.finalize(out, _GATHERED.pop, key, None)


def _pack(t: torch.Tensor) -> torch.Tensor | _Kept:
    found = _GATHERED.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if found is None or t._version != found[1]:  # changed in place since: kept as it is
        return t
    entry = found[0]
    entry.saved += 1
    return (entry, t.size(), t.stride(), t.storage_offset())


def _unpack(x: torch.Tensor | _Kept) -> torch.Tensor:
    if isinstance(x, tuple):
        entry, size, stride, offset = x
        return entry.view(size, stride, offset)
    return x


def keep_parts() -> Any:
    """The context a rank module's forward runs in when it all-gathers sequences for
    split compute: autograd keeps each rank's part only (see `_Regather`). Not under
    torch.compile (it traces without it), nor inside saved-tensor hooks of the caller's
    own (activation checkpointing, offloading), which keep theirs: the module then saves
    the gathered sequence whole."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    autograd = torch._C._autograd
    # torch's stubs lack _saved_tensors_hooks_is_enabled
    free = autograd._saved_tensors_hooks_is_enabled()  # type: ignore[attr-defined]
    if not free or autograd._top_saved_tensors_default_hooks(False) is not None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


class _ReduceScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim, "forward")

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.comm.all_gather_dim(grad, ctx.dim, "backward"), None, None


class _FMany(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, comm: Comm, groups: tuple[Held, ...], *xs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.comm, ctx.groups = comm, groups or (1,) * len(xs)
        ctx.set_materialize_grads(False)  # a parameter used under no_grad gets none
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    @once_differentiable  # a collective: a second derivative would need its own
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # the same on every rank: the graph's
        got = [(g, k) for g, k in zip(grads, ctx.groups, strict=True) if g is not None]
        if not got:
            return (None, None, *grads)
        comm = ctx.comm
        flat = comm.all_reduce(_slotted(got, comm.rank, comm.size), "backward", inplace=True)
        mine = _unslotted(flat, got, comm.rank, comm.size)
        return (None, None, *_with_nones(mine, grads))


# how the ranks hold a tensor whose gradient CopyManyToTP sums: `k`, the neighbouring ranks
# holding each of its slices (1: every rank, the whole summed), or (dim, runs): along `dim`,
# runs of (length, ranks holding each slice), a run held by one rank being its own (not
# summed): a fused Q|K|V's query part split over all ranks, its key/value parts shared
Held: TypeAlias = int | tuple[int, tuple[tuple[int, int], ...]]


def _runs(g: torch.Tensor, k: Held) -> list[tuple[torch.Tensor, int]]:
    """The parts of gradient `g` to sum, with the ranks holding each slice of them."""
    if isinstance(k, int):
        return [(g, k)]
    dim, runs = k
    out, at = [], 0
    for length, ranks in runs:
        if ranks > 1:
            out.append((g.narrow(dim, at, length), ranks))
        at += length
    return out


def _slotted(got: list[tuple[torch.Tensor, Held]], rank: int, tp: int) -> torch.Tensor:
    """One flat buffer of the gradients `got` ((gradient, held) pairs): a gradient of
    a tensor held by `k` neighbouring ranks (one of tp / k slices) in its slice's place,
    zeros in the others', so that the sum over all ranks is each slice's sum over its own
    ranks (run by run, where the tensor's runs are held by different numbers of ranks)."""
    parts = []
    for g, held in got:
        for run, k in _runs(g, held):
            if k == 1:
                parts.append(run.reshape(-1))
                continue
            part = run.new_zeros(tp // k, run.numel())
            part[rank // k] = run.reshape(-1)
            parts.append(part.reshape(-1))
    return _flatten(tuple(parts))


def _unslotted(
    flat: torch.Tensor, got: list[tuple[torch.Tensor, Held]], rank: int, tp: int
) -> list[torch.Tensor]:
    """Each gradient of `got` from the summed buffer `_slotted` made: its slice's part
    (and, of a tensor in runs, its own runs as they were)."""
    runs = [(run, k) for g, held in got for run, k in _runs(g, held)]
    sizes = [run.numel() * (tp // k if k > 1 else 1) for run, k in runs]
    # torch leaves Tensor.split unannotated
    pieces: tuple[torch.Tensor, ...] = flat.split(sizes)  # type: ignore[no-untyped-call]
    summed = iter(
        (part if k == 1 else part.view(tp // k, -1)[rank // k]).view_as(run)
        for part, (run, k) in zip(pieces, runs, strict=True)
    )
    out = []
    for g, held in got:
        if isinstance(held, int):
            out.append(next(summed))
            continue
        dim, at, joined = held[0], 0, []
        for length, k in held[1]:
            joined.append(next(summed) if k > 1 else g.narrow(dim, at, length))
            at += length
        out.append(torch.cat(joined, dim))
    return out


def _with_nones(got: list[torch.Tensor], grads: tuple[Any, ...]) -> list[Any]:
    """`got` in the places of `grads` that are not None."""
    it = iter(got)
    return [None if g is None else next(it) for g in grads]


def _flatten(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One flat buffer holding `ts` (of one dtype) end to end."""
    if any(t.dtype != ts[0].dtype for t in ts):
        raise AutoTPError(
            f"the tensors of one CopyManyToTP have dtypes {[str(t.dtype) for t in ts]}: "
            "their gradients are all-reduced as one buffer",
            hint="give the model one dtype (model.to(dtype))",
        )
    return torch.cat([t.reshape(-1) for t in ts])


def rank_slice(
    x: torch.Tensor, dim: int, parts: int, tp: int, rank: torch.Tensor,
    padded: int | None = None, replicas: int = 1, within: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """This rank's slice of a replicated tensor, split as S(dim x parts): the
    Replicate -> Shard redistribution, with no communication (its gradient fills the
    slice, zeros elsewhere, which is why the replicated value also gets f). `padded`: the
    dimension is first padded with zeros to that size (a bias over a padded vocabulary).
    `replicas`: the dimension holds tp / replicas slices, ranks r*replicas ... share one
    (a key/value head read by the query heads of several ranks). `within`: x is not
    replicated but a slice held by `within` neighbouring ranks, cut further among them."""
    if padded is not None and padded > x.shape[dim]:
        pad = list(x.shape)
        pad[dim] = padded - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    among, at = (tp, rank) if within is None else (within, rank % within)
    size, slices = x.shape[dim], among // replicas
    # torch leaves Tensor.unflatten unannotated
    grid: torch.Tensor = x.unflatten(  # type: ignore[no-untyped-call]
        dim, (parts, slices, size // (parts * slices))
    )
    which = (at.reshape(1) // replicas).to(torch.long)
    mine = grid.index_select(dim + 1, which).squeeze(dim + 1)
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
        return x if self.comm.size == 1 else _apply_one(_F, x, self.comm)

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
        return _apply_one(_G, x, self.comm, inplace)

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
        return _apply_one(_Gather, x, self.comm, dim, size)


class ScatterToSP(nn.Module):
    """Sequence parallelism: keep this rank's chunk along `dim` (no communication);
    backward all-gathers the gradient along `dim`."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.comm.size == 1 else _apply_one(_ScatterSP, x, self.comm, dim)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class GatherFromSP(nn.Module):
    """Sequence parallelism, in f's place before a column-split block: all-gather along
    `dim` (the ranks' chunks in rank order); backward reduce-scatters the gradient."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.comm.size == 1 else _apply_one(_GatherSP, x, self.comm, dim)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class ReduceScatterToSP(nn.Module):
    """Sequence parallelism, in g's place after a row-split block: reduce-scatter (sum)
    along `dim`; backward all-gathers the gradient."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.comm.size == 1 else _apply_one(_ReduceScatterSP, x, self.comm, dim)

    def extra_repr(self) -> str:
        return f"tp={self.comm.size}"


class CopyManyToTP(nn.Module):
    """f over several tensors at once: identity forward; backward all-reduces all their
    gradients as one flat buffer (Megatron's single all-reduce of the gradients of the
    parameters read in sequence-parallel regions). Returns a tuple. `groups`: for each
    tensor, how many neighbouring ranks hold its slice (a key/value projection shared by
    the query heads of several ranks); their gradients are summed among those ranks."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, *xs: torch.Tensor, groups: tuple[Held, ...] = ()) -> tuple[torch.Tensor, ...]:
        return tuple(xs) if self.comm.size == 1 else _apply_many(_FMany, self.comm, groups, *xs)

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
    def forward(ctx: Any, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        record_collective("backward", grads[0])
        total = _sum(grads)
        return tuple(total.clone() for _ in grads)


class _SimG(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        record_collective("forward", xs[0])
        total = _sum(xs)
        return tuple(total.clone() for _ in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grads


class _SimGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, dim: int, size: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        record_collective("forward", xs[0], "all_gather")
        ctx.dim, ctx.local = dim, xs[0].shape[dim]
        full = torch.cat(xs, dim=dim).narrow(dim, 0, size)
        return tuple(full.clone() for _ in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        own = [_own_slice(g, ctx.dim, ctx.local, r) for r, g in enumerate(grads)]
        return (None, None, *own)


def simulated_max(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-reduce max over all ranks (no gradient)."""
    if len(xs) == 1:
        return xs
    record_collective("forward", xs[0], "all_reduce_max")
    top = torch.stack([x.detach() for x in xs]).amax(dim=0)
    return [top.clone() for _ in xs]


def simulated_gather(xs: list[torch.Tensor], dim: int, size: int) -> list[torch.Tensor]:
    """All-gather along `dim` over all ranks, trimmed to `size`."""
    if len(xs) == 1:
        return [xs[0].narrow(dim, 0, size)]
    return list(_apply_many(_SimGather, dim, size, *xs))


def simulated_f(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """f over all ranks: each keeps its value; backward sums the ranks' gradients."""
    return list(_apply_many(_SimF, *xs)) if len(xs) > 1 else xs


def simulated_g(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """g over all ranks: each gets the sum; backward passes each rank its own gradient."""
    return list(_apply_many(_SimG, *xs)) if len(xs) > 1 else xs


class _SimScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, dim: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dim = dim
        return tuple(chunk(x, dim, len(xs), r) for r, x in enumerate(xs))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *_sim_all_gather(grads, ctx.dim, "backward"))


class _SimGatherSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, dim: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dim = dim
        outs = _sim_all_gather(xs, dim, "forward")
        parts = tuple(x.detach() for x in xs)  # kept as the real ranks keep them
        _remember(outs, parts[0], lambda: _sim_all_gather(parts, dim, "backward")[0])
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *_sim_reduce_scatter(grads, ctx.dim, "backward"))


class _SimReduceScatterSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, dim: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dim = dim
        return tuple(_sim_reduce_scatter(xs, dim, "forward"))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *_sim_all_gather(grads, ctx.dim, "backward"))


class _SimFMany(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, n: int, groups: tuple[Held, ...], *xs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.n, ctx.groups = n, groups or (1,) * n  # xs: rank 0's n tensors, then rank 1's, ...
        ctx.set_materialize_grads(False)  # a parameter used under no_grad gets none
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        per_rank = [grads[i : i + ctx.n] for i in range(0, len(grads), ctx.n)]
        tp = len(per_rank)
        got = [[(g, k) for g, k in zip(rank, ctx.groups, strict=True) if g is not None]
               for rank in per_rank]  # fmt: skip
        if not got[0]:
            return (None, None, *grads)
        flats = [_slotted(mine, r, tp) for r, mine in enumerate(got)]
        record_collective("backward", flats[0])
        total = _sum(tuple(flats))
        return (None, None, *[
            g for r, (mine, rank) in enumerate(zip(got, per_rank, strict=True))
            for g in _with_nones(_unslotted(total.clone(), mine, r, tp), rank)
        ])  # fmt: skip


def _sim_all_gather(xs: tuple[torch.Tensor, ...], dim: int, direction: str) -> list[torch.Tensor]:
    record_collective(direction, xs[0], "all_gather")
    full = torch.cat(xs, dim=dim)
    return [full.clone() for _ in xs]


def _sim_reduce_scatter(
    xs: tuple[torch.Tensor, ...], dim: int, direction: str
) -> list[torch.Tensor]:
    check_divisible(xs[0], dim, len(xs))
    record_collective(direction, xs[0], "reduce_scatter")
    total = _sum(xs)
    return [chunk(total, dim, len(xs), r) for r in range(len(xs))]


def simulated_scatter_to_sp(xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """ScatterToSP over all ranks: rank r keeps chunk r of its value along `dim`;
    backward all-gathers the ranks' gradient chunks."""
    return list(_apply_many(_SimScatterSP, dim, *xs)) if len(xs) > 1 else xs


def simulated_gather_from_sp(xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """GatherFromSP over all ranks: each gets the chunks joined along `dim`; backward
    hands rank r chunk r of the sum of the ranks' gradients."""
    return list(_apply_many(_SimGatherSP, dim, *xs)) if len(xs) > 1 else xs


def simulated_reduce_scatter_to_sp(xs: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """ReduceScatterToSP over all ranks: rank r gets chunk r of the sum along `dim`;
    backward all-gathers the ranks' gradient chunks."""
    return list(_apply_many(_SimReduceScatterSP, dim, *xs)) if len(xs) > 1 else xs


def simulated_copy_many(
    xs: list[tuple[torch.Tensor, ...]], groups: tuple[Held, ...] = ()
) -> list[tuple[torch.Tensor, ...]]:
    """CopyManyToTP over all ranks, `xs[r]` rank r's tensors: each keeps its values;
    backward sums the ranks' gradients (those of a tensor held by `groups[i]` ranks per
    slice among those ranks), recorded as one all-reduce of them all."""
    if len(xs) == 1:
        return [tuple(xs[0])]
    n = len(xs[0])
    ys = _apply_many(_SimFMany, n, groups, *[x for rank in xs for x in rank])
    return [tuple(ys[i : i + n]) for i in range(0, len(ys), n)]
