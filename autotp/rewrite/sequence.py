"""Sequence parallelism's own steps of the rewrite (rewrite.py runs them): a sequence read
whole, a LayerNorm module run on a split value, and one f for every parameter read by
split compute. The reduce-scatter in g's place is part of rewrite.py's reduce step."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import Argument

from ..match import ops
from ..runtime.collectives import Held
from ..sharding import Propagation, Shard
from .sites import (
    F_MODULE,
    F_PARAMS_MODULE,
    GATHER_MODULE,
    SP_GATHER_MODULE,
    after_mutations,
    copy_meta,
    record,
    site,
    site_kind,
    tag,
)

__all__ = ["sequence_gather", "functional_norm", "one_f_for_parameters"]


_FOR_SPLIT = "all-gather of the sequence for split compute; backward reduce-scatter"


def sequence_gather(
    graph: fx.Graph, env: dict[fx.Node, fx.Node], f_of: dict[fx.Node, fx.Node], src: fx.Node,
    value: fx.Node, readers: list[fx.Node], prop: Propagation, tp: int,
) -> fx.Node:  # fmt: skip
    """`readers` read the sequence-split `value` (now `src`) whole. Read only through its
    f (split compute: a column-split linear), one all-gather whose backward
    reduce-scatters the partial gradients (f's place in Megatron-LM's sequence
    parallelism); otherwise an all-gather whose backward keeps the rank's part of the
    gradient, and the f (if any) after it."""
    scatter = prop.scatters.get(value)
    split = scatter if scatter is not None else prop.placements[value]
    assert isinstance(split, Shard), f"a sequence split is a Shard, not {split}"
    dim = split.dim
    reading = {graph.output_node() if r.op == "output" else env[r] for r in readers}
    f = f_of.get(value)
    direct = {r for r in reading if src in r.all_input_nodes and r is not f}
    # f commutes with a reshape (identity forward, a sum backward): `x.view(-1, C)` read
    # only through f (a Conv1D's addmm) takes its gradient from the same reduce-scatter
    fused = (f is not None or direct) and all(_reshape_read_split(r, src) for r in direct)
    at = after_mutations(src, (*direct, *([f] if f is not None else [])))
    if fused:  # read by split compute only: one all-gather, its backward f's sum
        with graph.inserting_after(at):
            g = site(graph, SP_GATHER_MODULE, (src, dim), {}, f"gather_{value.name}")
        for r in direct:
            r.replace_input_with(src, g)
            for u in list(r.users):  # its f: the gather's backward does its sum
                u.replace_all_uses_with(r)
                graph.erase_node(u)
        if f is not None:
            f.replace_all_uses_with(g)
            graph.erase_node(f)
            f_of[value] = g
        what, why = "sp_gather", _FOR_SPLIT
    else:
        with graph.inserting_after(at):
            size = graph.call_method("size", (src, dim))
        with graph.inserting_after(size):
            serial = graph.call_function(operator.mul, (size, tp))
        with graph.inserting_after(serial):
            g = site(graph, GATHER_MODULE, (src, dim, serial), {}, f"gather_{value.name}")
        for r in (*direct, *([f] if f is not None else [])):
            r.replace_input_with(src, g)
        what = "sequence_gather"
        why = "all-gather of the sequence, read whole; backward keeps the rank's part"
    copy_meta(src, g)
    tag(g, collective=what, placement="R", why=why)
    return g


def functional_norm(graph: fx.Graph, gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A LayerNorm module on a split value, as F.layer_norm over its own parameters, each
    behind f: each rank normalises its part, so their gradients are partial sums."""
    # only exact nn.LayerNorm modules are run in functional form (compute.py)
    mod = cast(nn.LayerNorm, gm.get_submodule(str(node.target)))
    params: list[fx.Node | None] = []
    with graph.inserting_before(node):
        for name in ("weight", "bias"):
            if getattr(mod, name, None) is None:
                params.append(None)
                continue
            w = graph.get_attr(f"{node.target}.{name}")
            f = site(graph, F_MODULE, (w,), {}, f"f_{w.name}")
            tag(f, collective="f", rule="propagation", placement="R",
                 why="backward all-reduce: a norm's weight applied to a split value")  # fmt: skip
            params.append(f)
        args = (node.args[0], tuple(mod.normalized_shape), *params, mod.eps)
        new = graph.call_function(F.layer_norm, args)
    copy_meta(node, new)
    tag(new, placement=record(node).placement, why=f"{node.target} on a split value")
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def one_f_for_parameters(
    graph: fx.Graph, gm: fx.GraphModule, shared: Mapping[str, Held], sequence: bool
) -> None:  # fmt: skip
    """The f of every parameter read by split compute (with `sequence`; else of the
    `shared` ones only), as one call at the top of the graph per dtype: its backward
    all-reduces their gradients as one buffer, once, at the end of backward (Megatron-LM's
    all-reduce of the sequence-parallel parameters' gradients), not once per parameter.
    `shared`: parameters split in slices that several ranks hold (name -> ranks per
    slice, or per run of its parts), whose gradients are summed among those ranks in the
    same buffer."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    first: dict[str, fx.Node] = {}
    for n in [n for n in graph.nodes if n.op == "get_attr" and str(n.target) in shared]:
        if str(n.target) in first:  # one read of each: its gradient summed once
            n.replace_all_uses_with(first[str(n.target)])
            graph.erase_node(n)
        else:
            first[str(n.target)] = n
    for n in first.values():
        with graph.inserting_after(n):
            f = site(graph, F_MODULE, (n,), {}, f"f_{n.name}")
        copy_meta(n, f)
        n.replace_all_uses_with(f, delete_user_cb=lambda user, f=f: user is not f)
    sites = [
        n for n in graph.nodes
        if n.op == "call_module" and site_kind(n.target) == F_MODULE
        and _read(n).op == "get_attr" and str(_read(n).target) in params
        and (sequence or str(_read(n).target) in shared)
    ]  # fmt: skip
    by_dtype: dict[torch.dtype, list[fx.Node]] = {}
    for f in sites:  # one buffer holds one dtype (a float32 norm in a bf16 model: two)
        by_dtype.setdefault(params[str(_read(f).target)].dtype, []).append(f)
    anchor = next(n for n in graph.nodes if n.op != "placeholder").prev
    for dtype, group in by_dtype.items():
        groups = tuple(shared.get(str(_read(f).target), 1) for f in group)
        if len(group) < 2 and groups == (1,):
            continue
        for f in group:
            anchor.append(_read(f))  # a get_attr reads nothing: it can move to the top
            anchor = _read(f)
        name = "f_params" if len(by_dtype) == 1 else f"f_params_{str(dtype).split('.')[-1]}"
        kwargs: dict[str, Argument] = {"groups": groups} if set(groups) != {1} else {}
        with graph.inserting_after(anchor):
            many = site(graph, F_PARAMS_MODULE, tuple(_read(f) for f in group), kwargs, name)
        many.meta["val"] = tuple(
            torch.empty(params[str(_read(f).target)].shape, dtype=dtype, device="meta")
            for f in group
        )
        tag(many, collective="f", rule="propagation", placement="R",
             why=f"backward all-reduce of {len(group)} parameters' gradients, as one")  # fmt: skip
        anchor = many
        for i, f in enumerate(group):
            with graph.inserting_after(anchor):
                anchor = graph.call_function(operator.getitem, (many, i))
            copy_meta(f, anchor)
            f.replace_all_uses_with(anchor)
            graph.erase_node(f)


def _read(f: fx.Node) -> fx.Node:
    """What an f site reads: its one argument, a node (`site(graph, F_MODULE, (x,), ...)`)."""
    x = f.args[0]
    assert isinstance(x, fx.Node), f"an f site reads a node, not {x!r}"
    return x


def _reshape_read_split(node: fx.Node, src: fx.Node) -> bool:
    """A reshape of `src` whose every reader is an f (split compute)."""
    if node.op not in ("call_function", "call_method") or not node.users:
        return False
    if ops.op_name(node, None) not in ("view", "flatten") or node.args[0] is not src:  # type: ignore[arg-type]
        return False
    return all(
        u.op == "call_module" and site_kind(u.target) == F_MODULE and u.args[0] is node
        for u in node.users
    )
