"""The region form's tensors: each rank's shards of a region (`shell`), the parts of the
model outside its regions loaded from saved weights (`load_outside`), and the serial view
of a region-form model's state and gradients (`full_tensors`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn

from ..build.materialise import _fresh_module, as_like, gather_over, rank_shard, whole_over_dp
from ..build.weights import Weights, fill_buffers, init_missing, unsaved_buffers
from ..common.errors import AutoTPError
from ..common.tensor_names import names_by_tensor
from ..sharding import Shard

if TYPE_CHECKING:
    from .module import RegionTP

_log = logging.getLogger("autotp")

__all__ = ["shell", "load_outside", "full_tensors"]


def shell(
    region: nn.Module, splits: dict[str, Shard], rank: int, tp: int,
    weights: Weights | None = None, path: str = "",
    shared: dict[int, tuple[Shard | None, torch.Tensor]] | None = None,
    names_of: dict[int, list[str]] | None = None,
) -> nn.Module:  # fmt: skip
    """A copy of `region` holding rank `rank`'s shards of its tensors, cut from the
    region's or read from `weights` (the region at `path` of the model). `shared`: this
    rank's tensors already made for other regions, by the serial tensor's id, so that a
    tensor two regions hold (a tied embedding and output head) stays one; it must be split alike.
    `names_of`: every name of a serial tensor in the model (the file may hold any)."""
    made: dict[int, tuple[Shard | None, torch.Tensor]] = {} if shared is None else shared
    names = names_by_tensor(region)

    def new_tensor(t: torch.Tensor) -> torch.Tensor:
        mine = names.get(id(t), [""])
        spec = next((splits[n] for n in mine if n in splits), None)
        if id(t) not in made:
            name = f"{path}.{mine[0]}"
            every = (names_of or {}).get(id(t)) or [name]
            local = rank_shard(t, every, spec, rank, tp, weights)
            made[id(t)] = (spec, as_like(t, local))
        elif made[id(t)][0] != spec:
            raise AutoTPError(
                f"{path}.{mine[0]} is split {spec or 'not at all'} here but "
                f"{made[id(t)][0] or 'not at all'} where the model holds it too (a tied "
                "tensor): its regions must split it alike",
                hint="untie the weights, or report it",
            )
        return made[id(t)][1]

    return _fresh_module(region, new_tensor)


def load_outside(
    copied: nn.Module, model: nn.Module, weights: Weights, skip: tuple[str, ...]
) -> None:
    """Give `copied`'s tensors outside the regions their values from `weights`, one at a
    time. Buffers the file lacks (rotary frequencies: not saved) are made first, by the
    model's own initialiser (`fill_buffers`), so that it cannot touch a loaded weight."""
    fill_buffers(copied, weights)
    fresh = init_missing(copied, weights, skip)
    if fresh:  # as from_pretrained says it
        _log.warning(
            "Some weights of %s were not in %s and were initialised by the model's own "
            "initialiser, as from_pretrained does: %s. Train the model before using it.",
            type(model).__name__, weights.path, fresh,
        )  # fmt: skip
    every = [*copied.named_parameters(remove_duplicate=False),
             *copied.named_buffers(remove_duplicate=False)]  # fmt: skip
    names = {k: [n for n in v if not n.startswith(skip)]
             for k, v in names_by_tensor(copied).items()}  # fmt: skip
    unsaved = unsaved_buffers(copied)
    done: dict[int, torch.Tensor] = {}
    for name, t in every:
        if name.startswith(skip):
            continue
        if id(t) not in done:
            found = None if name in unsaved else weights.find(names[id(t)])
            if found is None:
                if t.is_meta:
                    raise weights.missing(name)
                done[id(t)] = t  # a value of the model's own (a buffer it computed)
                continue
            done[id(t)] = as_like(t, weights.read(found, dtype=t.dtype, shape=tuple(t.shape)))
        owner, _, leaf = name.rpartition(".")
        mod = copied.get_submodule(owner)
        # a Parameter's slot gets a Parameter (as_like keeps what the model's tensor is)
        where = cast(
            "dict[str, torch.Tensor | None]",
            mod._parameters if leaf in mod._parameters else mod._buffers,
        )
        where[leaf] = done[id(t)]


def full_tensors(module: nn.Module, grads: bool) -> dict[str, torch.Tensor | None]:
    """The serial state_dict (or gradients) of a region-form model, shards gathered (and
    first, where data parallelism sharded them further, a DTensor's full tensor)."""
    out: dict[str, torch.Tensor | None] = {}
    paths = cast("tuple[str, ...]", module.autotp_regions)  # set by form.build_regions
    regions = {p: cast("RegionTP", module.get_submodule(p)) for p in paths}
    skip = tuple(p + "." for p in regions)
    if grads:
        own = {n: p.grad for n, p in module.named_parameters(remove_duplicate=False)}
    else:
        own = dict(module.state_dict(keep_vars=True))
    for name, t in own.items():
        if not name.startswith(skip):
            out[name] = None if t is None else whole_over_dp(t).detach()
    for path, region in regions.items():
        splits = region.splits()
        per_rank = [
            {n: p.grad for n, p in shell.named_parameters(remove_duplicate=False)} if grads
            else shell.state_dict(keep_vars=True)
            for shell in region.shells
        ]  # fmt: skip
        for name in per_rank[0]:
            local = [r[name] for r in per_rank]
            if local[0] is None:
                out[f"{path}.{name}"] = None
            else:
                comm = region._autotp_comms[0]
                spec = splits.get(name)
                size = region._autotp_shapes[name][spec.dim] if spec is not None else None
                shards = cast("list[torch.Tensor]", local)  # every rank's, as rank 0's
                out[f"{path}.{name}"] = gather_over(shards, spec, region.tp, comm, size)
    return out
