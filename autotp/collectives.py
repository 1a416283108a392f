"""The two conjugate operators of Megatron-LM, as autograd Functions over a communicator.

    f: forward identity,  backward all-reduce   (before a column-split block)
    g: forward all-reduce, backward identity    (after a row-split block)

`torch.distributed.nn.functional.all_reduce` cannot serve as g: its backward all-reduces
too, multiplying gradients by tp (REFERENCE.md trap 7). In the rewritten graph f and g are
the submodules `tp_f` and `tp_g`; `simulate` runs the same graph with all ranks in one
process and replaces them by the in-process versions below.

Every all-reduce that runs is recorded by `count_collectives()`, so tests count the
collectives that actually ran in forward and backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "Comm", "ProcessGroupComm", "LocalComm", "CopyToTP", "ReduceFromTP",
    "CollectiveLog", "count_collectives", "simulated_f", "simulated_g",
]  # fmt: skip


@dataclass
class CollectiveLog:
    """All-reduces that ran: (direction, number of elements) per call."""

    events: list[tuple[str, int]] = field(default_factory=list)

    def count(self, direction: str | None = None) -> int:
        return sum(1 for d, _ in self.events if direction is None or d == direction)

    def elements(self, direction: str | None = None) -> int:
        return sum(n for d, n in self.events if direction is None or d == direction)


_LOGS: list[CollectiveLog] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Record every autotp all-reduce that runs inside the block (forward and backward)."""
    log = CollectiveLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(direction: str, t: torch.Tensor) -> None:
    for log in _LOGS:
        log.events.append((direction, t.numel()))


class Comm:
    """What the rewritten graph needs from a process group."""

    size: int = 1

    def all_reduce(self, t: torch.Tensor, direction: str) -> torch.Tensor:
        raise NotImplementedError


class LocalComm(Comm):
    """tp = 1: nothing to communicate."""

    def all_reduce(self, t: torch.Tensor, direction: str) -> torch.Tensor:
        return t


class ProcessGroupComm(Comm):
    """A torch.distributed process group (gloo or NCCL)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor, direction: str) -> torch.Tensor:
        out = t.contiguous().clone()
        _record(direction, out)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


class SimulatedComm(Comm):
    """Placeholder inside `simulate`: its f and g nodes are run by the simulator."""

    def __init__(self, size: int) -> None:
        self.size = size

    def all_reduce(self, t: torch.Tensor, direction: str) -> torch.Tensor:
        raise RuntimeError("a simulated rank module cannot run alone; call the simulate module")


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
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        return comm.all_reduce(x, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


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
    """g: all-reduce (sum) forward, identity backward."""

    def __init__(self, comm: Comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.comm.size == 1 else _G.apply(x, self.comm)

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


def simulated_f(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """f over all ranks: each keeps its value; backward sums the ranks' gradients."""
    return list(_SimF.apply(*xs)) if len(xs) > 1 else xs


def simulated_g(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """g over all ranks: each gets the sum; backward passes each rank its own gradient."""
    return list(_SimG.apply(*xs)) if len(xs) > 1 else xs
