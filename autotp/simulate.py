"""`simulate`: all tp ranks in one process, running the same per-rank graph `parallelize`
runs, with the collectives computed in-process and autograd-exact.

The ranks run in lock step, node by node over the shared graph: an ordinary node runs once
per rank on that rank's values and shards; an f or g node receives every rank's value at
once and runs the in-process collective (collectives.simulated_f/g), whose forward and
backward are exactly those of the all-reduce on real processes. The module returns rank 0's
outputs; in backward every rank receives the same output gradient, as every real rank
does from its own (identical) loss.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .collectives import simulated_f, simulated_g
from .rewrite import F_MODULE, G_MODULE

__all__ = ["SimulatedTP"]


class _Replicated(torch.autograd.Function):
    """Rank 0's copy of a replicated output; backward hands every rank the gradient."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = len(xs)
        return xs[0].view_as(xs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return tuple(grad for _ in range(ctx.n))


class SimulatedTP(nn.Module):
    """tp rank modules run in lock step in one process. Build it with `autotp.simulate`."""

    def __init__(self, ranks: list[fx.GraphModule]) -> None:
        super().__init__()
        self.ranks = nn.ModuleList(ranks)
        self._signature = inspect.signature(ranks[0].forward)

    @property
    def tp(self) -> int:
        return len(self.ranks)

    @property
    def plan(self) -> Any:
        return self.ranks[0].autotp.plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = iter(bound.arguments.values())
        ranks = list(self.ranks)
        interps = [fx.Interpreter(r, garbage_collect_values=False) for r in ranks]
        envs: list[dict[fx.Node, Any]] = [{} for _ in ranks]
        for it, env in zip(interps, envs, strict=True):
            it.env = env
        for node in ranks[0].graph.nodes:
            if node.op == "placeholder":
                value = next(inputs)
                for env in envs:
                    env[node] = value
            elif node.op == "call_module" and node.target in (F_MODULE, G_MODULE):
                xs = [env[node.args[0]] for env in envs]
                ys = (simulated_f if node.target == F_MODULE else simulated_g)(xs)
                for env, y in zip(envs, ys, strict=True):
                    env[node] = y
            elif node.op == "output":
                outs = [it.fetch_args_kwargs_from_env(node)[0][0] for it in interps]
                return _combine(outs)
            else:
                for it, env in zip(interps, envs, strict=True):
                    env[node] = it.run_node(node)
        raise AssertionError("graph has no output node")


def _combine(outs: list[Any]) -> Any:
    flat = [tree_flatten(o) for o in outs]
    leaves0, spec = flat[0]
    merged = []
    for i, leaf in enumerate(leaves0):
        if isinstance(leaf, torch.Tensor):
            merged.append(_Replicated.apply(*[f[0][i] for f in flat]))
        else:
            merged.append(leaf)
    return tree_unflatten(merged, spec)
