"""The block form's tensors: each rank's shards of a block (`shell`), the parts of the
model outside its blocks loaded from saved weights (`load_outside`), and the serial view
of a block-form model's state and gradients (`full_tensors`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import AutoTPError
from .materialise import _fresh_module, cut, gather
from .sharding import Shard
from .weights import Weights, fill_buffers

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
            spec = splits.get(name)
            if weights is not None and f"{path}.{name}" in weights:
                local = weights.read(f"{path}.{name}", spec, rank, tp, t.dtype, tuple(t.shape))
            elif t.is_meta and weights is not None:
                raise AutoTPError(
                    f"{path}.{name} is on the meta device and "
                    + f"not in {weights.path}"
                    + "\n  hint:   pass weights= a file or folder holding every tensor of the "
                    "model "
                    "(what save_pretrained of this model class writes)"
                )
            else:
                local = cut(t.detach(), spec, rank, tp).clone()
            made[id(t)] = (nn.Parameter(local, requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else local)  # fmt: skip
        return made[id(t)]

    return _fresh_module(block, new_tensor)


def load_outside(
    copied: nn.Module, model: nn.Module, weights: Weights, skip: tuple[str, ...]
) -> None:
    """Give `copied`'s tensors outside the blocks their values from `weights`, one at a
    time. Buffers the file lacks (rotary frequencies: not saved) are made first, by the
    model's own initialiser (`fill_buffers`), so that it cannot touch a loaded weight."""
    fill_buffers(copied, weights)
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
                    raise AutoTPError(
                        f"{name} is not in {weights.path}\n  hint:   pass weights= a file or "
                        "folder holding every tensor of the model (what save_pretrained of "
                        "this model class writes)"
                    )
                done[id(t)] = t  # a value of the model's own (a buffer it computed)
                continue
            value = weights.read(found, dtype=t.dtype, shape=tuple(t.shape))
            done[id(t)] = (nn.Parameter(value, t.requires_grad)
                           if isinstance(t, nn.Parameter) else value)  # fmt: skip
        owner, _, leaf = name.rpartition(".")
        mod = copied.get_submodule(owner)
        where = mod._parameters if leaf in mod._parameters else mod._buffers
        where[leaf] = done[id(t)]


def full_tensors(module: nn.Module, grads: bool) -> dict[str, torch.Tensor | None]:
    """The serial state_dict (or gradients) of a block-form model, shards gathered."""
    import torch.distributed as dist

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
            for shell in block.ranks
        ]  # fmt: skip
        for name in per_rank[0]:
            local = [r[name] for r in per_rank]
            spec = splits.get(name)
            if local[0] is None:
                out[f"{path}.{name}"] = None
                continue
            if spec is not None and len(local) == 1 and block.tp > 1:
                comm = block._comms[0]
                t = local[0].detach().contiguous()
                parts = [torch.empty_like(t) for _ in range(block.tp)]
                dist.all_gather(parts, t, group=comm.group)
                local = parts
            out[f"{path}.{name}"] = gather([t.detach() for t in local], spec)
    return out
