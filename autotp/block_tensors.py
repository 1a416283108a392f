"""The block form's tensors: each rank's shards of a block (`shell`), the parts of the
model outside its blocks loaded from saved weights (`load_outside`), and the serial view
of a block-form model's state and gradients (`full_tensors`)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .materialise import _fresh_module, as_like, gather_over, rank_shard
from .sharding import Shard
from .weights import Weights, fill_buffers, init_missing

_log = logging.getLogger("autotp")

__all__ = ["shell", "load_outside", "full_tensors"]


def shell(
    block: nn.Module, splits: dict[str, Shard], rank: int, tp: int,
    weights: Weights | None = None, path: str = "",
) -> nn.Module:  # fmt: skip
    """A copy of `block` holding rank `rank`'s shards of its tensors, cut from the block's
    or read from `weights` (the block at `path` of the model)."""
    made: dict[int, torch.Tensor] = {}
    names = {id(t): n for n, t in [*block.named_parameters(), *block.named_buffers()]}

    def new_tensor(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            name = names.get(id(t), "")
            local = rank_shard(t, [f"{path}.{name}"], splits.get(name), rank, tp, weights)
            made[id(t)] = as_like(t, local)
        return made[id(t)]

    return _fresh_module(block, new_tensor)


def load_outside(
    copied: nn.Module, model: nn.Module, weights: Weights, skip: tuple[str, ...]
) -> None:
    """Give `copied`'s tensors outside the blocks their values from `weights`, one at a
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
    names: dict[int, list[str]] = {}
    every = [*copied.named_parameters(remove_duplicate=False),
             *copied.named_buffers(remove_duplicate=False)]  # fmt: skip
    for name, t in every:
        if not name.startswith(skip):
            names.setdefault(id(t), []).append(name)
    done: dict[int, torch.Tensor] = {}
    for name, t in every:
        if name.startswith(skip):
            continue
        if id(t) not in done:
            found = weights.find(names[id(t)])
            if found is None:
                if t.is_meta:
                    raise weights.missing(name)
                done[id(t)] = t  # a value of the model's own (a buffer it computed)
                continue
            done[id(t)] = as_like(t, weights.read(found, dtype=t.dtype, shape=tuple(t.shape)))
        owner, _, leaf = name.rpartition(".")
        mod = copied.get_submodule(owner)
        where = mod._parameters if leaf in mod._parameters else mod._buffers
        where[leaf] = done[id(t)]


def full_tensors(module: nn.Module, grads: bool) -> dict[str, torch.Tensor | None]:
    """The serial state_dict (or gradients) of a block-form model, shards gathered."""
    out: dict[str, torch.Tensor | None] = {}
    blocks = {p: module.get_submodule(p) for p in module.autotp_blocks}
    skip = tuple(p + "." for p in blocks)
    if grads:
        own = {n: p.grad for n, p in module.named_parameters(remove_duplicate=False)}
    else:
        own = dict(module.state_dict(keep_vars=True))
    for name, t in own.items():
        if not name.startswith(skip):
            out[name] = None if t is None else t.detach()
    for path, block in blocks.items():
        splits = block.splits()
        per_rank = [
            {n: p.grad for n, p in shell.named_parameters()} if grads
            else shell.state_dict(keep_vars=True)
            for shell in block.shells
        ]  # fmt: skip
        for name in per_rank[0]:
            local = [r[name] for r in per_rank]
            if local[0] is None:
                out[f"{path}.{name}"] = None
            else:
                comm = block._autotp_comms[0]
                out[f"{path}.{name}"] = gather_over(local, splits.get(name), block.tp, comm)
    return out
