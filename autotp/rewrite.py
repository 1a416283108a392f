"""Stage 4, rewrite: turn the serial graph into the per-rank graph the plan describes.

One shared rewriter applies every rule (rules carry no surgery). It copies the traced graph
and then, in this order:
  1. inserts one f (`tp_f`) per replicated value that feeds split compute, shared by all
     its split consumers (Q, K and V read the same f);
  2. replaces each split linear by its functional form on the local shard; a row-split
     linear is followed by g (`tp_g`) and then its bias (REFERENCE.md trap 6);
  3. rewrites the shape arguments that propagation marked (`split(C)` -> `split(C/tp)`,
     `view(B, T, 12, 64)` -> `view(B, T, 12/tp, 64)`, `view(B, T, C)` -> `view(B, T, C//tp)`).
The graph is identical on every rank; only the parameters differ (materialise.py).
Every node created or changed records `meta["autotp"]`: the rule, the placement and what
changed, which is all the terminal views read. `graph.lint()` runs at the end.

Before/after for a GPT-2 MLP:
    h = c_fc(ln_2); a = gelu(h); y = c_proj(a)
    f = tp_f(ln_2); h = linear(f, w_fc, b_fc); a = gelu(h)
    p = linear(a, w_proj); g = tp_g(p); y = add(g, b_proj)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .match import LinearInfo, Match
from .rule import Column
from .shapes import ArgEdit, DivideByTP, Propagation

__all__ = ["rewrite", "F_MODULE", "G_MODULE"]

F_MODULE = "tp_f"
G_MODULE = "tp_g"


def _tag(node: fx.Node, **info: Any) -> None:
    node.meta.setdefault("autotp", {}).update(info)


def _set_path(node: fx.Node, path: tuple[int | str, ...], value: Any) -> None:
    def put(container: Any, rest: tuple[int | str, ...]) -> Any:
        if not rest:
            return value
        head, tail = rest[0], rest[1:]
        if isinstance(container, dict):
            new = dict(container)
            new[head] = put(container[head], tail)
            return new
        items = list(container)
        items[head] = put(items[head], tail)
        return type(container)(items) if isinstance(container, tuple) else items

    if isinstance(path[0], str):
        node.kwargs = put(node.kwargs, path)
    else:
        node.args = put(node.args, path)


def _linear_input_index(li: LinearInfo) -> int:
    return 1 if li.node.op == "call_function" and li.node.target is torch.addmm else 0


def rewrite(gm: fx.GraphModule, prop: Propagation, matches: list[Match], tp: int) -> fx.Graph:
    """The per-rank graph (a new fx.Graph; `gm` is untouched)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    rule_of = {li.node: m.rule.name for m in matches for li in m.linears.values()}

    for old, placement in prop.placements.items():
        if old in env:
            _tag(env[old], placement=str(placement))

    # 1. f: one per replicated value feeding split compute.
    for value, consumers in prop.f_inputs.items():
        src = env[value]
        with graph.inserting_after(src):
            f = graph.create_node("call_module", F_MODULE, (src,), {}, name=f"f_{src.name}")
        f.meta = {"val": src.meta.get("val"), "stack_trace": src.meta.get("stack_trace")}
        f.meta["nn_module_stack"] = src.meta.get("nn_module_stack", {})
        rules = sorted({rule_of.get(c, "propagation") for c in consumers})
        _tag(f, collective="f", rule=", ".join(rules), placement="R",
             why="backward all-reduce: the gradient of a replicated value used by split "
             "compute is a partial sum")  # fmt: skip
        for c in consumers:
            env[c].replace_input_with(src, f)

    # 2. split linears -> functional form on local shards.
    for old, (kind, li) in prop.splits.items():
        node = env[old]
        x = node.args[_linear_input_index(li)]
        rule = rule_of[old]
        place = str(kind)
        with graph.inserting_before(node):
            w = graph.get_attr(li.weight)
            b = graph.get_attr(li.bias) if li.bias else None
            _tag(w, rule=rule, placement=f"{place} shard of {li.weight}")
            if b is not None:
                _tag(b, rule=rule, placement=f"{place} shard" if isinstance(kind, Column) else "R")
            bias_inside = b if isinstance(kind, Column) else None
            if li.layout == "out_in":
                y = graph.call_function(F.linear, (x, w, bias_inside))
            else:
                y = graph.call_function(torch.matmul, (x, w))
                if bias_inside is not None:
                    y = graph.call_function(operator.add, (y, bias_inside))
            _copy_meta(node, y)
            local = str(prop.placements[old]) if isinstance(kind, Column) else "partial"
            _tag(y, rule=rule, split=place, weight=li.weight, placement=local)
            if not isinstance(kind, Column):
                g = graph.create_node("call_module", G_MODULE, (y,), {}, name=f"g_{node.name}")
                _copy_meta(node, g)
                why = "forward all-reduce: the row-split linear produces partial sums"
                _tag(g, collective="g", rule=rule, placement="R", why=why)
                y = g
                if b is not None:
                    y = graph.call_function(operator.add, (y, b))
                    _copy_meta(node, y)
                    _tag(y, rule=rule, placement="R", why="bias after the all-reduce")
        node.replace_all_uses_with(y)
        graph.erase_node(node)

    # 3. shape arguments.
    for e in prop.edits:
        _apply_edit(graph, env, e, tp)

    graph.lint()
    return graph


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for k in ("val", "stack_trace", "nn_module_stack"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def _apply_edit(graph: fx.Graph, env: dict[fx.Node, fx.Node], e: ArgEdit, tp: int) -> None:
    node = env[e.node]
    if isinstance(e.new, DivideByTP):
        src = env[e.new.source]
        with graph.inserting_before(node):
            new = graph.call_function(operator.floordiv, (src, tp))
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        _tag(new, placement="local", why=f"{src.name} is a serial size; the shard is 1/{tp}")
        shown = f"{src.name} -> {src.name} // {tp}"
    else:
        new, shown = e.new, f"{e.old} -> {e.new}"
    _set_path(node, e.path, new)
    edits = node.meta.setdefault("autotp", {}).setdefault("edits", [])
    edits.append(shown)
