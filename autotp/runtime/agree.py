"""What the ranks of a tensor-parallel group must agree on outside the parallel layers:
the random state (dropout and sampling in the model's own Python, which every rank runs
whole) and the inputs (every rank computes the same batch, each its own shards).

`same_random_state` makes the group's random state rank 0's when a model is built (data-
parallel code often seeds `seed + rank`); `check_first_call` compares a digest of the
inputs and of the random state across the group on the model's first call, and refuses a
group that disagrees (a DistributedSampler over the tensor-parallel ranks, a reseed per
rank after building). Both are one-off collectives of autotp's own, made with PyTorch's
tools set aside, so that a first call counted under CommDebugMode counts what every later
call runs."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..common.errors import AutoTPError
from ..common.tools import tools_aside

__all__ = ["same_random_state", "check_first_call", "digest"]


def same_random_state(group: dist.ProcessGroup | None) -> None:
    """Give every rank of `group` rank 0's CPU (and current CUDA device's) random state."""
    with tools_aside():
        states = [torch.get_rng_state()]
        # torch leaves torch.cuda.is_initialized unannotated
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            states.append(torch.cuda.get_rng_state())
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(states, src=src, group=group)
        torch.set_rng_state(states[0])
        if len(states) > 1:
            torch.cuda.set_rng_state(states[1])


def digest(args: tuple[Any, ...], kwargs: dict[str, Any], random_state: bool) -> dict[str, str]:
    """A short digest per input tensor (its shape, dtype and values) and of the random
    state (`random_state`): equal on two ranks exactly when what they got is equal."""
    names = [f"argument {i}" for i in range(len(args))] + list(kwargs)
    out = {}
    for name, value in zip(names, [*args, *kwargs.values()], strict=True):
        group = tree_flatten(value)[0]
        h = hashlib.blake2b(digest_size=8)
        for t in group:
            if isinstance(t, torch.Tensor):
                h.update(repr((tuple(t.shape), t.dtype)).encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if any(isinstance(t, torch.Tensor) for t in group):
            out[name] = h.hexdigest()
    if random_state:
        rng = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8)
        out["the random state"] = rng.hexdigest()
    return out


def check_first_call(model: nn.Module, group: dist.ProcessGroup | None, random_state: bool) -> None:
    """On `model`'s first call, refuse unless every rank of `group` got the same inputs
    and (`random_state`) holds the same random state. Later calls pay nothing."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        handle.remove()
        mine = digest(args, kwargs, random_state)
        with tools_aside():
            every: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(every, mine, group=group)
        for rank, theirs in enumerate(every):
            differ = [k for k in mine if theirs.get(k) != every[0].get(k)]
            if differ:
                raise AutoTPError(
                    f"the ranks of the tensor-parallel group disagree in {differ[0]}: rank "
                    f"{rank} differs from rank 0. Every rank computes the same batch, each "
                    "with its own shards, so their inputs and random state must be equal",
                    hint="give every rank of a tensor-parallel group the same batch (a "
                    "DistributedSampler over the data-parallel ranks only) and the same "
                    "seed (torch.manual_seed(seed + data_parallel_rank))",
                )

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
