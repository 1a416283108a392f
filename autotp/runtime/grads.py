"""Gradients whose norms are the serial model's: `torch.nn.utils.clip_grad_norm_` (and
`get_total_norm`) on a parallel module's parameters return the serial norm on every rank,
and so clip every rank by the same factor.

A rank's parameters are plain tensors, and the norm torch computes from them is a rank's
own: a split parameter holds 1/tp of its squares, a replicated one all of them. torch
computes a total norm as the norm of the per-tensor norms (`torch._foreach_norm`, or
`torch.linalg.vector_norm` one tensor at a time); so it is the serial one when each
gradient's norm is what it contributes to the serial total:

    parallelize, split parameter     the norm over the TP group (one all-reduce of the
                                     group's norms per call, summed as p-th powers, or
                                     the max for ord=inf); a slice several ranks hold
                                     (Shard.replicas) counts once
    simulate, split parameter        its own shard's norm (the ranks' shards are all in
                                     the list the caller passes, and add up); zero on
                                     all but the first rank holding a shared slice
    simulate, replicated, rank > 0   zero (rank 0's copy counts it once)
    anything else                    its own norm, as torch computes it

A gradient that needs one of the first three is a `SplitGrad`: the gradient tensor itself
(the same memory, as `Tensor.as_subclass` gives) with the rule attached, set on `.grad`
by a hook after every accumulation. Every other operation on it (optimizer steps, fused
or foreach, clipping's multiply, zeroing) runs as on a plain tensor and returns plain
tensors. A norm computed another way (`p.grad.pow(2).sum()`) is a rank's own:
`autotp.full_grads` gives the serial gradients.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import torch
import torch.nn as nn
from torch._C import DisableTorchFunctionSubclass

from .comm import Comm, ProcessGroupComm, SimulatedComm

__all__ = ["SplitGrad", "count_norms"]

_NORMS: set[Callable[..., Any]] = {torch.linalg.vector_norm, torch.norm, torch.Tensor.norm}


# what each entry of a gradient counts in the serial total (its p-th power times this): one
# share for the whole tensor (1 / the ranks holding each slice; 0: a simulated replica),
# or (dim, runs of (length, share)) along dim, for a tensor whose runs are held by
# different numbers of ranks (a fused Q|K|V whose key/value heads several ranks hold)
Share: TypeAlias = float | tuple[int, tuple[tuple[int, float], ...]]


class SplitGrad(torch.Tensor):
    """A gradient whose norm is its share of the serial norm (see the module)."""

    _autotp_comm: Comm | None  # split over this group; None: not summed (simulate)
    _autotp_share: Share  # what each entry's p-th power counts of the serial total

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        with DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func is torch._foreach_norm:
            return _foreach(args, kwargs, out)
        if func in _NORMS and isinstance(args[0], SplitGrad):
            ord_, whole = _norm_args(func, args, kwargs)
            if whole:
                return _shares([args[0]], [out], ord_)[0]
        return out


def _norm_args(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float, bool]:
    """(ord, whether the norm is over the whole tensor) of a vector_norm / norm call."""
    if func is torch.linalg.vector_norm:
        ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
    else:
        ord_ = args[1] if len(args) > 1 else kwargs.get("p", "fro")
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        ord_ = 2 if ord_ in ("fro", None) else ord_
    whole = dim is None and isinstance(ord_, (int, float))
    return float(ord_) if whole else 0.0, whole


def _foreach(
    args: tuple[Any, ...], kwargs: dict[str, Any], out: list[torch.Tensor]
) -> list[torch.Tensor]:
    tensors = list(args[0])
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    if not isinstance(ord_, (int, float)):
        return out
    which = [i for i, t in enumerate(tensors) if isinstance(t, SplitGrad)]
    shared = _shares([tensors[i] for i in which], [out[i] for i in which], float(ord_))
    out = list(out)
    for i, value in zip(which, shared, strict=True):
        out[i] = value
    return out


def _shares(grads: list[SplitGrad], norms: list[torch.Tensor], ord_: float) -> list[torch.Tensor]:
    """Each gradient's norm as its share of the serial total (see the module)."""
    out = list(norms)
    by_comm: dict[int, list[int]] = {}
    for i, g in enumerate(grads):
        if g._autotp_comm is None:
            out[i] = _own(g, norms[i], ord_)
        else:
            by_comm.setdefault(id(g._autotp_comm), []).append(i)
    for idx in by_comm.values():
        comm = grads[idx[0]]._autotp_comm
        assert comm is not None
        if math.isinf(ord_):  # the largest entry of the group, or the smallest
            sign = 1.0 if ord_ > 0 else -1.0
            local = torch.stack([norms[i].double() for i in idx])
            total = comm.all_reduce(sign * local, "step", "max") * sign
        else:
            local = torch.stack([_powered(grads[i], norms[i], ord_) for i in idx])
            total = comm.all_reduce(local, "step")
            total = total if ord_ == 0 else total.pow(1.0 / ord_)  # ord 0: a count
        for j, i in enumerate(idx):
            out[i] = total[j].to(norms[i].dtype)
    return out


def _powered(g: SplitGrad, norm: torch.Tensor, ord_: float) -> torch.Tensor:
    """The sum of `g`'s entries' p-th powers (their count for ord 0) times their shares."""
    share = g._autotp_share
    if isinstance(share, float):
        return (norm.double() if ord_ == 0 else norm.double().pow(ord_)) * share
    dim, runs = share
    total, at = torch.zeros((), dtype=torch.double, device=norm.device), 0
    with DisableTorchFunctionSubclass():
        for length, part in runs:
            run = torch.linalg.vector_norm(g.narrow(dim, at, length), ord_).double()
            total = total + (run if ord_ == 0 else run.pow(ord_)) * part
            at += length
    return total


def _own(g: SplitGrad, norm: torch.Tensor, ord_: float) -> torch.Tensor:
    """The norm of what `g` counts on its own (not summed over ranks: simulate)."""
    if isinstance(g._autotp_share, float):  # a replica another rank counts
        return torch.zeros_like(norm) if g._autotp_share == 0 else norm
    if math.isinf(ord_):  # the runs it does not count are equal to others' that count
        return norm
    total = _powered(g, norm, ord_)
    return (total if ord_ == 0 else total.pow(1.0 / ord_)).to(norm.dtype)


def _as_split(grad: torch.Tensor, comm: Comm | None, share: Share) -> torch.Tensor:
    if isinstance(grad, SplitGrad) or grad.is_sparse:
        return grad
    out = grad.as_subclass(SplitGrad)
    out._autotp_comm, out._autotp_share = comm, share
    return out


# parameters whose gradients count_norms hooks (not an attribute: a deepcopy would carry
# it to a parameter without the hook)
_HOOKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def count_norms(gm: nn.Module, comm: Comm, rank: int, splits: dict[str, Any]) -> None:
    """Make the gradients of a rank module's parameters SplitGrads where their norm must
    count otherwise than their own (see the module), after every accumulation: split ones
    over the process group, a simulated replica (rank > 0) as zero. A parameter several
    rank modules share (a region's call patterns) is hooked once. A frozen one (torch
    hooks no tensor that needs no gradient) is hooked at the first call after it is
    unfrozen."""
    frozen = []
    for name, p in gm.named_parameters():
        if _HOOKED.get(id(p)) is p:
            continue
        spec = splits.get(name)
        counted = _counted(spec, comm, rank, name in splits)
        if counted is None:
            continue
        group, share = counted
        if p.requires_grad:
            _hook(p, group, share)
        else:
            frozen.append((p, group, share))
    if frozen:  # checked before each call (simulate runs its ranks' graphs itself)

        def unfrozen(*_: Any) -> None:
            for p, group, share in frozen:
                if p.requires_grad and _HOOKED.get(id(p)) is not p:
                    _hook(p, group, share)
            frozen[:] = [f for f in frozen if not f[0].requires_grad]

        # torch types a module's attributes as tensors and modules only
        gm.autotp_unfrozen = unfrozen  # type: ignore[assignment]
        gm.register_forward_pre_hook(unfrozen)


def _counted(spec: Any, comm: Comm, rank: int, split: bool) -> tuple[Comm | None, Share] | None:
    """(the group its norm is summed over, its share) of a parameter split as `spec`
    (`split`: in the plan's splits), or None where its own norm is its share."""
    tp = comm.size
    if isinstance(comm, ProcessGroupComm) and tp > 1 and split:
        if not spec.part_replicas:
            return comm, 1.0 / spec.replicas
        return comm, (spec.dim, tuple((n, 1.0 / g) for n, g in spec.held(tp)))
    if not isinstance(comm, SimulatedComm):
        return None
    if not split:  # a replica: rank 0's copy counts it once
        return (None, 0.0) if rank > 0 else None
    # a slice counts on the first rank holding it
    if not spec.part_replicas:
        return None if rank % spec.replicas == 0 else (None, 0.0)
    counts = tuple((n, 1.0 if rank % g == 0 else 0.0) for n, g in spec.held(tp))
    return None if all(c == 1.0 for _, c in counts) else (None, (spec.dim, counts))


def _hook(p: torch.Tensor, group: Comm | None, share: Share) -> None:
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad = _as_split(param.grad, group, share)

    p.register_post_accumulate_grad_hook(hook)  # type: ignore[no-untyped-call]  # torch: unannotated
    _HOOKED[id(p)] = p
