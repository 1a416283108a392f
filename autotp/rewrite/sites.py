"""Call sites and provenance: what every pass that changes a graph writes on its nodes.

Each collective and dropout call in a per-rank graph is a module of its own (a *site*,
`kind.<node name>`), so module hooks and tools that track modules (CommDebugMode) see each
run once per forward; `node.meta["autotp"]` holds a NodeRecord: which rule, which
placement, what changed, which is all the terminal views and reports read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch.fx.node import Argument

from ..match import ops
from ..runtime import collective_kinds as kinds
from ..sharding import Shard

__all__ = [
    "NodeRecord", "record", "tag", "site", "site_kind", "copy_meta", "placement_text",
    "F_MODULE", "G_MODULE", "MAX_MODULE", "GATHER_MODULE", "REDUCE_SCATTER_MODULE",
    "SP_GATHER_MODULE", "SCATTER_MODULE", "F_PARAMS_MODULE", "DROPOUT_MODULES", "RANK_BUFFER",
    "COLLECTIVE_MODULES", "after_mutations",
]  # fmt: skip

# the collective sites' modules, each kind declared in collective_kinds
F_MODULE = kinds.F.module
G_MODULE = kinds.G.module
MAX_MODULE = kinds.MAX.module
GATHER_MODULE = kinds.GATHER.module
REDUCE_SCATTER_MODULE = kinds.REDUCE_SCATTER.module
SP_GATHER_MODULE = kinds.SP_GATHER.module
SCATTER_MODULE = kinds.SCATTER.module
F_PARAMS_MODULE = kinds.F_PARAMS.module
DROPOUT_MODULES = {"shared": "tp_dropout_shared", "rank": "tp_dropout_rank"}
RANK_BUFFER = "tp_rank"  # a 0-dim tensor holding the rank: the only per-rank constant
COLLECTIVE_MODULES = tuple(k.module for k in kinds.KINDS)


@dataclass(slots=True)
class NodeRecord:
    """What the rewrite records on a node it created or changed, `node.meta["autotp"]`:
    everything the terminal views, the reports and the rank builders read."""

    rule: str | None = None  # the rule (or "propagation", "output") behind the change
    placement: str | None = None  # the value's placement, as text ("R", "S(2)", "P")
    collective: str | None = None  # a collective site's name (collective_kinds: names)
    why: str | None = None  # one line: why this node is here
    split: str | None = None  # a split layer's split ("column", "row", "vocab", ...)
    weight: str | None = None  # a split layer's weight
    edits: list[str] = field(default_factory=list)  # shape arguments rewritten, as text
    dropout: str | None = None  # a dropout site's stream: "shared" or "rank"
    dropout_of: str | None = None  # the dropout module a site replaces
    split_output: tuple[Shard, int | None] | None = None  # returned split, kept local
    split_input: Shard | None = None  # an input each rank is given its slice of


def record(node: fx.Node) -> NodeRecord:
    """The node's record (an empty one where the rewrite changed nothing)."""
    rec = node.meta.get("autotp")
    return rec if isinstance(rec, NodeRecord) else NodeRecord()


def tag(node: fx.Node, **info: Any) -> None:
    rec = node.meta.get("autotp")
    if not isinstance(rec, NodeRecord):
        rec = node.meta["autotp"] = NodeRecord()
    for key, value in info.items():
        setattr(rec, key, value)  # slots: a misspelt field fails here


def site(
    graph: fx.Graph,
    kind: str,
    args: tuple[Argument, ...],
    kwargs: dict[str, Argument],
    name: str,
) -> fx.Node:
    """A call of a module of its own, `kind.<node name>`: every collective and dropout call
    site has one, so module hooks and tools that track modules (CommDebugMode) see each
    module run once per forward, as in the serial model."""
    node = graph.create_node("call_module", kind, args, kwargs, name=name)
    node.target = f"{kind}.{node.name}"
    return node


def site_kind(target: object) -> str:
    """The kind of a per-site module (F_MODULE, G_MODULE, ...) from its target."""
    return str(target).split(".", 1)[0]


def placement_text(p: object) -> str:
    if isinstance(p, (tuple, list)):
        return "(" + ", ".join(placement_text(x) for x in p) + ")"
    return str(p)


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for k in ("val", "stack_trace", "nn_module_stack"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def after_mutations(src: fx.Node, readers: Iterable[fx.Node]) -> fx.Node:
    """Where a collective reading `src` for `readers` goes: right after `src`, or after the
    last in-place op on it before the first reader (`m = x.cumsum(1); m.mul_(0.5)`: the
    readers see the changed tensor, and so must the collective)."""
    changes = [u for u in src.users if ops.mutates(u)]
    if not changes:  # the usual case: no walk over the graph
        return src
    order = {n: i for i, n in enumerate(src.graph.nodes)}
    first = min((order[r] for r in readers if r in order), default=len(order))
    anchor = src
    for u in changes:
        if order[anchor] < order[u] < first:
            anchor = u
    return anchor
