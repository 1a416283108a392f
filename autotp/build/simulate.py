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

import contextlib
import inspect
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..capture.trace import restore_grad, set_grad
from ..planning.plan import Plan
from ..rewrite.sites import (
    SP_GATHER_MODULE,
    record,
    site_kind,
)
from ..runtime.collective_kinds import F_PARAMS, KINDS
from ..runtime.collectives import (
    keep_parts,
)
from ..sharding import Shard
from ..sharding.placement import cut
from .materialise import check_mode, gather, rank_info

# every kind but the parameters' f, whose call carries its groups (its own step below)
_SIMULATED = {k.module: k.simulated for k in KINDS if k is not F_PARAMS}

__all__ = ["SimulatedTP", "plain_containers"]

# Nodes that change the process's state rather than a rank's values: run once per node.
_GLOBAL_STATE = (set_grad, restore_grad)


class _Replicated(torch.autograd.Function):
    """Rank 0's copy of a replicated output; backward hands every rank the gradient."""

    @staticmethod
    def forward(ctx: Any, *xs: torch.Tensor) -> torch.Tensor:
        ctx.n = len(xs)
        return xs[0].view_as(xs[0])

    @staticmethod  # one output, so one gradient (Function's takes one per output)
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(grad for _ in range(ctx.n))


class SimulatedTP(nn.Module):
    """tp rank modules run in lock step in one process. Build it with `autotp.simulate`."""

    def __init__(self, ranks: list[fx.GraphModule]) -> None:
        super().__init__()
        self.ranks = nn.ModuleList(ranks)
        self.rank_outputs: list[Any] = []  # each rank's own outputs from the last forward
        self._signature = inspect.signature(ranks[0].forward)
        self.training = ranks[0].training  # the ranks keep their per-module modes
        self._gathers_sequences = any(  # keeps each rank's part for backward, as real ranks
            n.op == "call_module" and site_kind(n.target) == SP_GATHER_MODULE
            for n in ranks[0].graph.nodes
        )

    @property
    def tp(self) -> int:
        return len(self.ranks)

    @property
    def plan(self) -> Plan:
        return rank_info(self.ranks[0]).plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        try:
            with keep_parts() if self._gathers_sequences else contextlib.nullcontext():
                return self._forward(*args, **kwargs)
        except BaseException:  # raised inside a no_grad region of the graph: not left off
            torch._C._set_grad_enabled(grad)
            raise

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        check_mode(self.ranks[0])
        for rank_module in self.ranks:  # what a rank module's own call checks first (grads.py)
            unfrozen = rank_module.__dict__.get("autotp_unfrozen")
            if unfrozen is not None:
                unfrozen()
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        ranks = cast(list[fx.GraphModule], list(self.ranks))  # as given to __init__
        codegen = ranks[0].graph._codegen  # flattens and rebuilds pytree I/O (torch.export)
        inputs = iter(codegen.process_inputs(*bound.arguments.values()))
        interps = [fx.Interpreter(r, garbage_collect_values=False) for r in ranks]
        envs: list[dict[fx.Node, Any]] = [{} for _ in ranks]
        for it, env in zip(interps, envs, strict=True):
            it.env = env
        rng = _GlobalRNG()
        for node in ranks[0].graph.nodes:
            if node.op == "placeholder":
                value = next(inputs)
                shard = record(node).split_input
                for r, env in enumerate(envs):  # each rank its own copy, as on real ranks
                    if shard is not None:  # or its own slice (a cache of its own heads)
                        env[node] = cut(value, shard, r, len(ranks))
                    else:
                        env[node] = value if r == 0 else tree_map(_own_copy, value)
            elif node.op == "call_module" and site_kind(node.target) == F_PARAMS.module:
                ys = F_PARAMS.simulated([tuple(env[a] for a in node.args) for env in envs],
                                         node.kwargs.get("groups", ()))  # fmt: skip
                for env, y in zip(envs, ys, strict=True):
                    env[node] = y
            elif node.op == "call_module" and site_kind(node.target) in _SIMULATED:
                xs = [env[node.args[0]] for env in envs]
                rest = [envs[0][a] if isinstance(a, fx.Node) else a for a in node.args[1:]]
                ys = _SIMULATED[site_kind(node.target)](xs, *rest)
                for env, y in zip(envs, ys, strict=True):
                    env[node] = y
            elif node.op == "output":
                outs = [
                    plain_containers(it.fetch_args_kwargs_from_env(node)[0][0]) for it in interps
                ]
                self.rank_outputs = outs
                return codegen.process_outputs(_combine(outs, _split_outputs(node)))
            elif node.op == "call_function" and node.target in _GLOBAL_STATE:
                value = interps[0].run_node(node)  # the process's grad mode: set it once
                for env in envs:
                    env[node] = value
            else:  # every rank draws what rank 0 drew, as seeded real ranks do
                before = rng.get() if len(ranks) > 1 else None
                for r, (it, env) in enumerate(zip(interps, envs, strict=True)):
                    if r == 1:
                        after = rng.get()
                    if r > 0:
                        assert before is not None  # saved: more than one rank
                        rng.set(before)
                    try:
                        env[node] = it.run_node(node)
                    except Exception as e:
                        e.add_note(f"autotp.simulate: rank {r}, node {node.format_node()}")
                        raise
                if before is not None:
                    rng.set(after)
        raise AssertionError("graph has no output node")


def plain_containers(x: Any) -> Any:
    """fx's immutable dicts and lists as the plain ones a GraphModule's code returns."""
    if isinstance(x, dict):
        return {k: plain_containers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain_containers(v) for v in x]
    if isinstance(x, tuple):
        items = [plain_containers(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # namedtuple?
    return x


def _own_copy(x: Any) -> Any:
    """A simulated rank's own copy of an input (rank 0 gets the caller's tensor): a
    change made in place happens once per rank, and the input gradient is rank 0's."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(x.requires_grad)


# the CPU generator's state, and each CUDA device's (None without CUDA)
_RNGState = tuple[torch.Tensor, list[torch.Tensor] | None]


class _GlobalRNG:
    """The global random state (CPU, and CUDA once initialised), saved and restored around
    each node so that random ops on replicated values draw the same on every rank."""

    def __init__(self) -> None:
        # torch leaves is_initialized unannotated
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]

    def get(self) -> _RNGState:
        return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.cuda else None)

    def set(self, state: _RNGState) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            assert state[1] is not None  # get() saved them: self.cuda
            torch.cuda.set_rng_state_all(state[1])


def _split_outputs(node: fx.Node) -> list[tuple[Shard, int | None] | None]:
    """For each output leaf: (split, serial size) if it is returned split, else None."""
    leaves = tree_flatten(node.args[0])[0]
    out: list[tuple[Shard, int | None] | None] = []
    for leaf in leaves:
        out.append(record(leaf).split_output if isinstance(leaf, fx.Node) else None)
    return out


def _combine(outs: list[Any], splits: list[tuple[Shard, int | None] | None]) -> Any:
    flat = [tree_flatten(o) for o in outs]
    leaves0, spec = flat[0]
    merged: list[Any] = []
    for i, leaf in enumerate(leaves0):
        if not isinstance(leaf, torch.Tensor):
            merged.append(leaf)
        elif i < len(splits) and (split := splits[i]) is not None:  # kept split: show it whole
            shard, size = split
            merged.append(gather([f[0][i] for f in flat], shard, size))
        else:
            # torch leaves Function.apply unannotated
            merged.append(_Replicated.apply(*[f[0][i] for f in flat]))  # type: ignore[no-untyped-call]
    return tree_unflatten(merged, spec)
