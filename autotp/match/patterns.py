"""Stage 2, match: find the structures the rules describe, in any spelling.

1. `find_linears` recognises every linear with a weight parameter, whatever computes it.
2. `host_graph` builds a networkx view of the activation flow in the normalised
   vocabulary (ops.py), contracting connected elementwise/layout/softmax ops into one
   "glue" node, so that `view -> transpose` or `gelu` vs the tanh formula do not matter.
   Edges carry the argument positions they feed.
3. `match` runs subgraph monomorphism of each rule's patterns against it, in rule order,
   and keeps matches whose linears are not yet claimed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import networkx as nx
import torch
import torch.fx as fx
from networkx.algorithms import isomorphism

from . import ops
from .call import Call, canonical
from .rule import Column, Rule, Split

__all__ = [
    "LinearInfo", "EmbeddingInfo", "Match", "find_linears", "find_embeddings", "host_graph",
    "match", "activations", "Context", "Unsplit",
]  # fmt: skip


@dataclass(frozen=True)
class LinearInfo:
    """A linear layer found in the graph: `y = x W^T + b` (out_in) or `y = x W + b` (in_out);
    a kernel-1 Conv1d (conv1d: W is [out, in, 1], features along dim -2 of x and y); or a
    routed expert, `bmm(W[ids], x)` with W [experts, out, in] and x [tokens, in, k]
    (experts: each token through the expert it was routed to)."""

    node: fx.Node
    input: fx.Node
    weight: str  # qualified parameter name
    bias: str | None
    layout: str  # "out_in", "in_out", "conv1d" or "experts"
    in_features: int
    out_features: int
    input_index: int | str = 0  # where the input is: position (addmm: 1) or keyword
    weight_view: fx.Node | None = None  # what reads W for the linear: W.T, W[ids]
    feature_dim: int = -1  # the dimension of the input and the output holding features

    @property
    def weight_axes(self) -> tuple[int, int]:
        """The weight's (output features, input features) dimensions."""
        return {"out_in": (0, 1), "in_out": (1, 0), "conv1d": (0, 1), "experts": (1, 2)}[
            self.layout
        ]


@dataclass(frozen=True)
class EmbeddingInfo:
    """A lookup `weight[ids]` (nn.Embedding or F.embedding with a parameter weight)."""

    node: fx.Node
    input: fx.Node
    weight: str
    num_embeddings: int
    embedding_dim: int
    ids_index: int | str = 0  # where the ids are: position (aten.embedding: 1) or keyword
    padding_idx: int | None = None  # a row that receives no gradient
    bias = None
    layout = "rows"


Layer = LinearInfo | EmbeddingInfo


@dataclass
class Context:
    """What a rule's `accept` condition may consult."""

    gm: fx.GraphModule
    embeddings: dict[fx.Node, EmbeddingInfo]
    accepted: list[Match]
    # weights the model itself declares as its vocabulary tables (a transformers model's
    # input and output embeddings), by their name in gm: a region holding one alone
    # shows no other evidence of a vocabulary
    tables: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Match:
    rule: Rule
    nodes: dict[str, fx.Node]  # pattern node -> fx node (a glue region's first node)
    layers: dict[str, Layer]  # split pattern nodes -> their layer

    def splits(self) -> dict[fx.Node, tuple[Split, Layer]]:
        return {li.node: (self.rule.split[k], li) for k, li in self.layers.items()}

    def narrowed(self, tp: int) -> tuple[Match, Match] | None:
        """(the block split as its rule's next fallback that can hold at `tp`, the layers
        that fallback leaves replicated), or None when the rule has no fallback left."""
        chain = list(self.rule.fallback)
        while chain and not _fits(chain[0], tp):
            chain.pop(0)
        if not chain:
            return None
        rule = dataclasses.replace(self.rule, split=chain[0], fallback=tuple(chain[1:]))
        kept = {k: li for k, li in self.layers.items() if k in chain[0]}
        dropped = {k: li for k, li in self.layers.items() if k not in chain[0]}
        return Match(rule, self.nodes, kept), Match(self.rule, self.nodes, dropped)


class Unsplit(NamedTuple):
    """A matched block a plan leaves replicated, and why (the refusal that stopped its
    split): a plan splits the rest."""

    match: Match
    why: str


def _fits(split: Mapping[str, Split], tp: int) -> bool:
    """Can each slice of `split` be shared by its ranks at `tp` (at least two slices)?"""
    columns = [s for s in split.values() if isinstance(s, Column)]
    shared = [s.replicas for s in columns]
    # a part may be whole on every rank (g == tp) where another part of it is split
    parts = [s.part_replicas for s in columns if s.part_replicas]
    return all(tp % g == 0 and g < tp for g in shared) and all(
        all(tp % g == 0 and g <= tp for g in p) and min(p) < tp for p in parts
    )


def _param(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            t = gm.get_parameter(str(node.target))
        except AttributeError:
            return None
        return t
    return None


_TRANSPOSES = {("getattr", "T"), ("getattr", "mT"), ("t", None), ("transpose", (0, 1)),
               ("transpose", (1, 0)), ("transpose", (-1, -2)), ("transpose", (-2, -1)),
               ("transpose", (0, -1)), ("transpose", (-1, 0)), ("permute", (1, 0)),
               ("numpy_T", None)}  # fmt: skip


def _transposed_param(gm: fx.GraphModule, node: object, reader: fx.Node) -> fx.Node | None:
    """The get_attr of a 2-D parameter W when `node` is W.T, W.mT, W.t(), W.transpose(0, 1)
    or W.permute(1, 0) in any spelling (method, function, aten) read by `reader` alone."""
    if not isinstance(node, fx.Node) or not node.op.startswith("call") or not node.args:
        return None
    if set(node.users) != {reader} or node.kwargs:
        return None
    w = _param(gm, node.args[0])
    if w is None or w.dim() != 2:
        return None
    name = ops.op_name(node, gm)
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
    elif node.op == "call_function" and node.target is torch.t:
        name = "t"
    rest = tuple(node.args[1:])
    if name == "getattr":
        key = rest[0] if rest else None
    elif name == "permute" and len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        key = tuple(rest[0])
    else:
        key = rest or None
    first = node.args[0]  # the weight's get_attr (_param found a parameter there)
    return first if (name, key) in _TRANSPOSES and isinstance(first, fx.Node) else None


_LINEAR_OPS = frozenset({"linear", "matmul", "addmm", "conv1d"})  # what may compute one


def find_linears(gm: fx.GraphModule) -> dict[fx.Node, LinearInfo]:
    """Every node computing a linear map with a parameter weight, in any argument spelling
    (positional or keyword)."""
    found: dict[fx.Node, LinearInfo] = {}
    for n in gm.graph.nodes:
        name = ops.op_name(n, gm) if n.op.startswith("call") else ""
        call = canonical(n, gm, name) if name in _LINEAR_OPS else None
        if call is not None and name == "linear" and n.op == "call_module":
            x, where = call.input, call.path("input")[0]
            bias = f"{n.target}.bias" if call["bias"] is not None else None
            if isinstance(x, fx.Node):
                found[n] = LinearInfo(
                    n, x, f"{n.target}.weight", bias, "out_in",
                    call["in_features"], call["out_features"], where,
                )  # fmt: skip
        elif call is not None and name == "linear":  # F.linear(x, w, b), aten.linear
            x, wnode, bnode = call.input, call["weight"], call["bias"]
            w, b = _param(gm, wnode), _param(gm, bnode)
            if (
                isinstance(x, fx.Node) and w is not None and w.dim() == 2
                and (bnode is None or b is not None)
            ):  # fmt: skip
                found[n] = LinearInfo(
                    n, x, str(wnode.target), b is not None and str(bnode.target) or None,
                    "out_in", w.shape[1], w.shape[0], call.path("input")[0],
                )  # fmt: skip
        elif call is not None and name == "conv1d":
            info = _kernel_one_conv(gm, call)
            if info is not None:
                found[n] = info
        elif call is not None and name == "matmul" and (wnode := _routed_weight(gm, call.input)):
            w, x = gm.get_parameter(str(wnode.target)), call["other"]  # bmm(W[ids], x): experts
            if isinstance(x, fx.Node) and _dim(x) == 3:
                found[n] = LinearInfo(
                    n, x, str(wnode.target), None, "experts", w.shape[2], w.shape[1],
                    call.path("other")[0], weight_view=call.input, feature_dim=-2,
                )  # fmt: skip
        elif call is not None and name == "matmul" and set(call.args) == {"input", "other"}:
            x, wnode = call.input, call["other"]  # x @ W, x @ W.T
            w = _param(gm, wnode)
            if w is not None and w.dim() == 2 and isinstance(x, fx.Node):
                found[n] = LinearInfo(
                    n, x, str(wnode.target), None, "in_out", w.shape[0], w.shape[1],
                    call.path("input")[0],
                )  # fmt: skip
            wnode = None if n in found else _transposed_param(gm, wnode, n)
            if wnode is not None and isinstance(x, fx.Node):
                w = gm.get_parameter(str(wnode.target))
                found[n] = LinearInfo(
                    n, x, str(wnode.target), None, "out_in", w.shape[1], w.shape[0],
                    call.path("input")[0], weight_view=call["other"],
                )  # fmt: skip
        elif call is not None and name == "addmm" and set(call.args) == {"input", "mat1", "mat2"}:
            b, w = _param(gm, call.input), _param(gm, call["mat2"])  # b + x @ W (Conv1D)
            if w is not None and b is not None and w.dim() == 2 and b.dim() == 1:
                found[n] = LinearInfo(
                    n, call["mat1"], str(call["mat2"].target), str(call.input.target),
                    "in_out", w.shape[0], w.shape[1], call.path("mat1")[0],
                )  # fmt: skip
    return found


def _dim(n: fx.Node) -> int:
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _routed_weight(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """The get_attr of W when `node` is W[ids] (W a 3-D parameter [experts, out, in], ids a
    1-D integer tensor) read by nothing but one op."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or not node.op.startswith("call"):
        return None
    name = ops.op_name(node, gm)
    if name not in ("index", "getitem") or len(node.args) != 2:
        return None
    base, idx = node.args
    if name == "index" and isinstance(idx, (list, tuple)) and len(idx) == 1:
        idx = idx[0]
    w = _param(gm, base)
    ids = idx.meta.get("val") if isinstance(idx, fx.Node) else None
    routed = isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point()
    found = routed and w is not None and w.dim() == 3
    return base if found and isinstance(base, fx.Node) else None


def _kernel_one_conv(gm: fx.GraphModule, call: Call) -> LinearInfo | None:
    """A Conv1d that is a linear over channels: kernel 1, stride 1, no padding, dilation 1,
    one group (x is [..., in, length])."""
    n = call.node
    if n.op == "call_module":
        w, weight = call["weight"], f"{n.target}.weight"
        bias = f"{n.target}.bias" if call["bias"] is not None else None
    else:
        w, b = _param(gm, call["weight"]), _param(gm, call["bias"])
        if w is None or (call["bias"] is not None and b is None):
            return None
        weight = str(call["weight"].target)
        bias = str(call["bias"].target) if b is not None else None

    def one(v: object, want: int) -> bool:
        return v == want or (isinstance(v, (list, tuple)) and list(v) == [want])

    plain = one(call["stride"], 1) and one(call["dilation"], 1) and call["groups"] == 1
    plain = plain and (one(call["padding"], 0) or call["padding"] == "valid")
    x = call.input
    if not (plain and w.dim() == 3 and w.shape[2] == 1 and isinstance(x, fx.Node)):
        return None
    return LinearInfo(
        n, x, weight, bias, "conv1d", w.shape[1], w.shape[0], call.path("input")[0],
        feature_dim=-2,
    )  # fmt: skip


def find_embeddings(gm: fx.GraphModule) -> dict[fx.Node, EmbeddingInfo]:
    """Every lookup in a parameter table."""
    found: dict[fx.Node, EmbeddingInfo] = {}
    for n in gm.graph.nodes:
        if not n.op.startswith("call") or ops.op_name(n, gm) != "embedding":
            continue
        call = canonical(n, gm, "embedding")
        ids, pad = call.input, call["padding_idx"]
        if n.op == "call_module":
            w, name = call["weight"], f"{n.target}.weight"
        else:
            w = _param(gm, call["weight"])
            name = str(call["weight"].target) if w is not None else ""
        if w is not None and w.dim() == 2 and isinstance(ids, fx.Node):
            if isinstance(pad, int) and pad < 0:
                pad += w.shape[0]
            if pad is not None and not isinstance(pad, int):
                continue  # a computed padding row: not recognised, so never split
            where = call.path("input")[0]
            found[n] = EmbeddingInfo(n, ids, name, w.shape[0], w.shape[1], where, pad)
    return found


def activations(gm: fx.GraphModule) -> dict[fx.Node, None]:
    """Tensor-valued nodes that depend on a model input (not only on weights/constants), in
    graph order (an ordered set)."""
    act: dict[fx.Node, None] = {}  # ordered like the graph: iteration never depends on ids
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        is_tensors = isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)
        if not (isinstance(v, torch.Tensor) or is_tensors):
            continue
        if n.op == "placeholder" or any(a in act for a in n.all_input_nodes):
            act[n] = None
    return act


def _arg_positions(n: fx.Node) -> list[tuple[fx.Node, int | str]]:
    out: list[tuple[fx.Node, int | str]] = []
    positions: list[tuple[int | str, Any]] = [*enumerate(n.args), *n.kwargs.items()]
    for pos, a in positions:

        def note(x: fx.Node, pos: int | str = pos) -> fx.Node:
            out.append((x, pos))
            return x

        fx.node.map_arg(a, note)
    return out


def host_graph(gm: fx.GraphModule, linears: dict[fx.Node, LinearInfo]) -> nx.DiGraph:
    """The activation-flow graph in the matcher's vocabulary, glue regions contracted.
    The graph's output node is included (op "output") so rules can anchor on it."""
    act = activations(gm)
    act.update((n, None) for n in gm.graph.nodes if n.op == "output")

    def kind(n: fx.Node) -> str:
        if n in linears:
            return "linear"
        name = ops.op_name(n, gm)
        if name in ops.GLUE:
            return "glue"
        if name in ops.NORM:
            return "norm"
        known = ("matmul", "sdpa", "embedding", "cross_entropy", "output")
        return name if name in known else "other"

    kinds = {n: kind(n) for n in act}
    edges: list[tuple[fx.Node, fx.Node, int | str]] = []
    for n in act:
        if n in linears:
            edges.append((linears[n].input, n, 0))
            continue
        edges.extend((a, n, pos) for a, pos in _arg_positions(n) if a in act)
    # Contract glue: union-find over glue-glue edges a -> b where a feeds only b, or b reads
    # only a. A value that several regions read (BERT's extended attention mask, shared
    # by every layer; the residual stream) stays a border, so one layer's region never
    # reaches into another's.
    readers: dict[fx.Node, set[fx.Node]] = {n: set() for n in act}
    inputs: dict[fx.Node, set[fx.Node]] = {n: set() for n in act}
    for a, b, _ in edges:
        readers[a].add(b)
        inputs[b].add(a)
    parent = {n: n for n in act}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for a, b, _ in edges:
        if kinds[a] == kinds[b] == "glue" and (len(readers[a]) == 1 or len(inputs[b]) == 1):
            ra, rb = find(a), find(b)
            if ra is not rb:
                first, second = (ra, rb) if order[ra] < order[rb] else (rb, ra)
                parent[second] = first
    g = nx.DiGraph()
    for n in act:
        r = find(n)
        if r not in g:
            g.add_node(r, op=kinds[r], members=[], inputs=set())
        g.nodes[r]["members"].append(n)
    for a, b, pos in edges:
        ra, rb = find(a), find(b)
        if ra is rb:
            continue
        g.nodes[rb]["inputs"].add(ra)
        if not g.has_edge(ra, rb):
            g.add_edge(ra, rb, args=set())
        if kinds[b] != "glue":
            g.edges[ra, rb]["args"].add(pos)
    return g


def _node_match(host: dict[str, Any], pat: dict[str, Any]) -> bool:
    if host["op"] != pat["op"]:
        return False
    return pat["inputs"] is None or len(host["inputs"]) <= pat["inputs"]


def _edge_match(host: dict[str, Any], pat: dict[str, Any]) -> bool:
    return bool(pat["args"] <= host["args"])


def match(
    gm: fx.GraphModule,
    rules: Sequence[Rule],
    linears: dict[fx.Node, LinearInfo] | None = None,
    tables: frozenset[str] = frozenset(),
) -> list[Match]:
    """Matches of `rules` in `gm`, earlier rules first; each layer is claimed at most once.
    `tables`: see Context."""
    linears = find_linears(gm) if linears is None else linears
    embeddings = find_embeddings(gm)
    layers: dict[fx.Node, Layer] = {**embeddings, **linears}
    host = host_graph(gm, linears)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[fx.Node] = set()
    found: list[Match] = []
    ctx = Context(gm, embeddings, found, tables)
    for rule in rules:
        candidates: list[Match] = []
        for pat in rule.patterns:
            gmatcher = isomorphism.DiGraphMatcher(
                host, pat, node_match=_node_match, edge_match=_edge_match
            )
            for mapping in gmatcher.subgraph_monomorphisms_iter():
                nodes = {p: h for h, p in mapping.items()}
                if any(nodes[k] not in layers for k in rule.split):
                    continue
                candidates.append(Match(rule, nodes, {k: layers[nodes[k]] for k in rule.split}))
        # A total order (first layer, then every matched node by pattern name), so the
        # same matches win in every process, whatever the hash seed or memory layout.
        candidates.sort(
            key=lambda m: (
                min(order[li.node] for li in m.layers.values()),
                tuple(order[m.nodes[p]] for p in sorted(m.nodes)),
            )
        )
        for m in candidates:
            mine = {li.node for li in m.layers.values()}
            if mine & claimed or (rule.accept is not None and not rule.accept(m, ctx)):
                continue
            claimed |= mine
            found.append(m)
    found.sort(key=lambda m: min(order[li.node] for li in m.layers.values()))
    return found
