"""The hidden state one parallel layer hands the next under sequence parallelism, split
along the sequence, through the model's own Python between them (Megatron-LM keeps the
residual stream split between layers; a transformers model's loop only passes it on).

A `HandedOver` is a tensor of the serial shape, dtype and device holding the rank's part
(every rank's parts joined, in `simulate`): the next parallel layer takes the part as it
is. Anything else the model's Python does with it (the final norm after the last layer, a
hook, a sum of two layers' outputs) reads its metadata as the serial tensor's, or computes
on the serial tensor, all-gathered then (once; its gradient keeps the rank's part, as the
model's Python runs alike on every rank), so the model computes what it did serially. A
write into it (in place) is a write into that serial tensor, which the next layer then
reads whole; so does a layer under a full backward hook, whose identity Function reads
its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._C import DisableTorchFunctionSubclass
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_map

from ..common.errors import AutoTPError
from .collectives import GatherFromTP, _own_slice
from .comm import Comm, record_collective

__all__ = ["HandedOver", "hand_over", "taken_over"]

# what reads only the metadata a rank's part shares with the serial tensor's
_METADATA = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.numel,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.get_device,
    torch.Tensor.__len__, torch.Tensor.nelement,
    *(getattr(torch.Tensor, a).__get__ for a in (
        "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout",
        "is_sparse", "is_quantized", "is_leaf", "grad_fn",
    )),
}  # fmt: skip


class HandedOver(torch.Tensor):
    """A hidden state split along dimension `dim` (see the module)."""

    _autotp_part: torch.Tensor  # this rank's part (simulate: the whole, its parts joined)
    _autotp_dim: int
    _autotp_tp: int
    _autotp_gather: GatherFromTP | None  # None: the part is the whole already (simulate)
    _autotp_whole: torch.Tensor | None
    _autotp_changed: bool  # written in place since: the part is stale

    @staticmethod
    def __new__(
        cls, part: torch.Tensor, dim: int, size: int, comm: Comm | None, tp: int
    ) -> HandedOver:  # fmt: skip
        shape = list(part.shape)
        shape[dim] = size
        out = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=part.dtype, device=part.device, requires_grad=part.requires_grad
        )
        out._autotp_part, out._autotp_dim, out._autotp_tp = part, dim, tp
        out._autotp_gather = GatherFromTP(comm) if comm is not None and comm.size > 1 else None
        out._autotp_whole = None
        out._autotp_changed = False
        return out

    def whole(self) -> torch.Tensor:
        """The serial tensor (gathered once; again where gradients are recorded now but
        were not when it was gathered)."""
        w = self._autotp_whole
        if w is not None and torch.is_grad_enabled() and not self._autotp_changed:
            if self._autotp_part.requires_grad and not w.requires_grad:
                self._autotp_whole = None
        if self._autotp_whole is None:
            part, dim = self._autotp_part, self._autotp_dim
            if self._autotp_gather is None:  # simulate: the parts joined already
                chunk = part.narrow(dim, 0, part.shape[dim] // self._autotp_tp)
                record_collective("forward", chunk, "all_gather")
                self._autotp_whole = part
            else:
                self._autotp_whole = self._autotp_gather(part, dim, self.shape[dim])
        return self._autotp_whole

    # torch's Tensor.__repr__ is typed without self
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"HandedOver({self.whole()!r})"

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if _in_place(func, kwargs):  # the serial tensor changes: the next layer takes it
            for a in (*args, *kwargs.values()):
                if isinstance(a, HandedOver) and not a._autotp_changed:
                    a._autotp_whole = a.whole().clone()  # of its own (a gather is a view)
                    a._autotp_changed = True
        whole = tree_map(lambda a: a.whole() if isinstance(a, HandedOver) else a, (args, kwargs))
        with DisableTorchFunctionSubclass():
            return func(*whole[0], **whole[1])

    @classmethod
    def __torch_dispatch__(
        cls,
        func: Any,
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        raise AutoTPError(
            f"{func} reached a hidden state handed over between parallel layers below "
            "Python (autotp gathers it for Python code)",
            hint="report the model; sequence_parallel=False avoids the hand-over",
        )


class _Wrap(torch.autograd.Function):
    """part -> HandedOver, so that a gradient reaching the HandedOver itself (through an
    op of a tool's that reads it whole, e.g. a module hook's identity Function) reaches
    the part: the rank's slice of it, as the Python that read it runs alike on every
    rank (in simulate, the part is the whole)."""

    @staticmethod
    def forward(
        ctx: Any, part: torch.Tensor, dim: int, size: int, comm: Comm | None, tp: int
    ) -> HandedOver:
        ctx.dim, ctx.local = dim, part.shape[dim]
        ctx.rank = comm.rank if comm is not None and comm.size > 1 else None
        return HandedOver(part, dim, size, comm, tp)

    # torch types backward as (ctx, *grad_outputs)
    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        if isinstance(grad, HandedOver):
            grad = grad.whole()
        if ctx.rank is not None:
            grad = _own_slice(grad, ctx.dim, ctx.local, ctx.rank)
        return grad, None, None, None, None


_WRITING_DUNDERS = frozenset(
    f"__i{op}__" for op in (
        "add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "lshift",
        "rshift", "and", "or", "xor",
    )
) | {"__setitem__"}  # fmt: skip


def _in_place(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether `func` may write into its tensor arguments (add_, +=, x[i] = ..., out=)."""
    name = getattr(func, "__name__", "")
    method = name.endswith("_") and not name.startswith("__")
    return method or name in _WRITING_DUNDERS or "out" in kwargs


def hand_over(part: torch.Tensor, dim: int, size: int, comm: Comm | None, tp: int) -> HandedOver:
    """`part` (a rank's, `comm` its group; in simulate, the whole and None) as the hidden
    state the next layer takes split along `dim` over `tp` ranks, of serial length `size`."""
    # torch leaves Function.apply unannotated
    out: HandedOver = _Wrap.apply(part, dim, size, comm, tp)  # type: ignore[no-untyped-call]
    return out


def taken_over(x: Any) -> torch.Tensor | None:
    """The part a HandedOver holds, for the next parallel layer; None for anything else,
    or for one written since it was handed over (the next layer reads it whole)."""
    return x._autotp_part if isinstance(x, HandedOver) and not x._autotp_changed else None
