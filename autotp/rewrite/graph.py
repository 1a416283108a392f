"""Stage 4, rewrite: turn the serial graph into the per-rank graph the plan describes.

One shared rewriter applies every rule (rules carry no surgery). It copies the traced graph
and then, in this order:
  1. inserts one f (`tp_f`) per replicated value that feeds split compute, shared by all
     its split consumers (Q, K and V read the same f);
  2. replaces each split linear by its functional form on the local shard (a row-split
     linear without its bias: its output is partial) and each vocabulary-split embedding
     by the partial lookup;
  3. inserts one g (`tp_g`) per partial value read whole, right after it, then the
     value's pending terms (two partials added together stay partial and share one g, and
     a replicated term added to a partial value is added once, after the sum);
     and a cut (`rank_slice`) where split compute reads a slice of a replicated value;
  4. rewrites the shape arguments that propagation marked (`split(C)` -> `split(C/tp)`,
     `view(B, T, 12, 64)` -> `view(B, T, 12/tp, 64)`, `view(B, T, C)` -> `view(B, T, C//tp)`);
  5. the vocab-parallel loss, gathers of split outputs, dropout streams.
The graph is identical on every rank; only the parameters differ (build.materialise).
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
from torch.fx.node import Argument
from torch.utils._pytree import tree_flatten

from ..common.errors import describe_node, node_error
from ..match import ops
from ..match.call import canonical
from ..match.patterns import EmbeddingInfo, LinearInfo, Match
from ..match.rule import Row
from ..runtime.collectives import Held, rank_slice
from ..runtime.vocab import vocab_ce_reduce, vocab_ce_terms, vocab_embedding, vocab_row_max
from ..sharding import (
    ArgEdit,
    Cut,
    DivideByTP,
    LossInfo,
    MultiplyByTP,
    Partial,
    Propagation,
    Shard,
)  # fmt: skip
from .guards import check_sizes
from .sequence import functional_norm, one_f_for_parameters, sequence_gather
from .sites import (
    DROPOUT_MODULES,
    F_MODULE,
    G_MODULE,
    GATHER_MODULE,
    MAX_MODULE,
    RANK_BUFFER,
    REDUCE_SCATTER_MODULE,
    SCATTER_MODULE,
    after_mutations,
    copy_meta,
    placement_text,
    record,
    site,
    tag,
)

__all__ = ["rewrite"]


def _get_path(node: fx.Node, path: tuple[int | str, ...]) -> Any:
    a: Any = node.args[path[0]] if isinstance(path[0], int) else node.kwargs[path[0]]
    for i in path[1:]:
        a = a[i]
    return a


def _set_path(node: fx.Node, path: tuple[int | str, ...], value: Any) -> None:
    def put(container: Any, rest: tuple[int | str, ...]) -> Any:
        if not rest:
            return value
        head, tail = rest[0], rest[1:]
        if isinstance(container, slice):  # x[a:b]: head is "start", "stop" or "step"
            parts: dict[int | str, Any] = {
                k: getattr(container, k) for k in ("start", "stop", "step")
            }
            parts[head] = put(parts[head], tail)
            return slice(parts["start"], parts["stop"], parts["step"])
        if isinstance(container, dict):
            new = dict(container)
            new[head] = put(container[head], tail)
            return new
        assert isinstance(head, int), f"a list or tuple is indexed by position, not {head!r}"
        items = list(container)
        items[head] = put(items[head], tail)
        return type(container)(items) if isinstance(container, tuple) else items

    if isinstance(path[0], str):
        node.kwargs = put(node.kwargs, path)
    else:
        node.args = put(node.args, path)


def rewrite(gm: fx.GraphModule, prop: Propagation, matches: list[Match], tp: int) -> fx.Graph:
    """The per-rank graph (a new fx.Graph; `gm` is untouched)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # shared, read only: e.g. torch.export pytree I/O
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    rule_of = {li.node: m.rule.name for m in matches for li in m.layers.values()}

    for old, placement in prop.placements.items():
        if old in env:
            tag(env[old], placement=placement_text(placement))
            if old.op == "placeholder" and isinstance(placement, Shard):
                tag(env[old], split_input=placement)

    # 1. f: one per replicated value feeding split compute.
    f_of: dict[fx.Node, fx.Node] = {}
    for value, consumers in prop.f_inputs.items():
        src = env[value]
        with graph.inserting_after(after_mutations(src, [env[c] for c in consumers])):
            f = site(graph, F_MODULE, (src,), {}, f"f_{src.name}")
        f.meta = {"val": src.meta.get("val"), "stack_trace": src.meta.get("stack_trace")}
        f.meta["nn_module_stack"] = src.meta.get("nn_module_stack", {})
        rules = sorted({rule_of.get(c, "propagation") for c in consumers})
        tag(f, collective="f", rule=", ".join(rules), placement="R",
             why="backward all-reduce: the gradient of a replicated value used by split "
             "compute is a partial sum")  # fmt: skip
        for c in consumers:
            env[c].replace_input_with(src, f)
        f_of[value] = f

    # 2. split layers -> functional form on local shards.
    for old, (kind, li) in prop.splits.items():
        node = env[old]
        rule = rule_of[old]
        if isinstance(li, EmbeddingInfo):
            env[old] = _split_embedding(graph, node, li, rule)
            continue
        x = _get_path(node, (li.input_index,))
        place = str(kind)
        if li.layout == "experts":  # bmm(W[ids], x) reads W by name: its shard, unchanged
            tag(node, rule=rule, split=place, weight=li.weight,
                 placement=placement_text(prop.placements[old]))  # fmt: skip
            continue
        with graph.inserting_before(node):
            w = graph.get_attr(li.weight)
            row = isinstance(kind, Row)  # a row split's bias is added after the sum (step 3)
            b = graph.get_attr(li.bias) if li.bias and not row else None
            tag(w, rule=rule, placement=f"{place} shard of {li.weight}")
            if b is not None:
                tag(b, rule=rule, placement=f"{place} shard")
            if li.layout == "out_in":
                y = graph.call_function(F.linear, (x, w, b))
            elif li.layout == "conv1d":  # kernel 1: a linear over the channels
                y = graph.call_function(F.conv1d, (x, w, b))
            else:
                y = graph.call_function(torch.matmul, (x, w))
                if b is not None:
                    y = graph.call_function(operator.add, (y, b))
            copy_meta(node, y)
            tag(y, rule=rule, split=place, weight=li.weight,
                 placement=placement_text(prop.placements[old]))  # fmt: skip
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        env[old] = y
        view = env.get(li.weight_view) if li.weight_view is not None else None
        _erase_unused(graph, view)  # `x @ W.T`: the transpose of W

    # a mean (sum) over a split dimension: each rank's / tp (/ the ranks holding each
    # slice), its summand of the serial one
    for old, divisor in prop.means.items():
        if divisor == 1:
            continue
        mean = env[old]
        with graph.inserting_after(mean):
            share = graph.call_function(operator.truediv, (mean, divisor))
        for user in [u for u in mean.users if u is not share]:
            user.replace_input_with(mean, share)
        copy_meta(mean, share)
        tag(
            share,
            rule="propagation",
            placement="P",
            why=f"a mean or sum over a split dimension: this rank's share of it (/ {divisor})",
        )
        env[old] = share

    # 3. P -> R: one g per partial value read whole, then its pending terms; R -> S: cuts.
    summed: dict[fx.Node, fx.Node] = {}  # partial value -> its sum (or sequence split)
    for value, readers in prop.reduces.items():
        summed[value] = _reduce(graph, env, f_of, value, readers, prop, rule_of)
    for old in reversed(prop.deferred):  # `p + r` kept partial: the node passes p through
        env[old].replace_all_uses_with(env[prop.deferred[old]])
        graph.erase_node(env[old])
        env[old] = env[prop.deferred[old]]
    whole: dict[fx.Node, fx.Node] = {}  # sequence-split value -> its all-gather
    for value, readers in prop.sequence_gathers.items():
        src = summed.get(value, env[value])
        whole[value] = sequence_gather(graph, env, f_of, src, value, readers, prop, tp)
    for cut in prop.cuts:
        _cut(graph, env, f_of, whole, cut, tp)
    for old in gm.graph.nodes:  # in graph order: every rank builds the same graph
        if old in prop.functional_norms:
            env[old] = functional_norm(graph, gm, env[old])

    # 4. shape arguments.
    for e in prop.edits:
        _apply_edit(graph, env, e, tp)

    # 5. the vocab-parallel loss, split outputs gathered, dropout on the right stream.
    for old, info in prop.losses.items():
        env[old] = _vocab_parallel_loss(graph, env[old], info)
    out_node = graph.output_node()
    leaves = tree_flatten(gm.graph.output_node().args[0])[0]
    now = dict(zip(leaves, tree_flatten(out_node.args[0])[0], strict=True))  # after the sums
    local = {leaves[i] for i in prop.local_outputs if -len(leaves) <= i < len(leaves)}
    for old, (shard, size) in prop.gathers.items():
        if not prop.gather_outputs or old in local:
            tag(now.get(old, env[old]), split_output=(shard, size))
            continue
        with graph.inserting_before(out_node):
            gather = site(
                graph, GATHER_MODULE, (env[old], shard.dim, size), {}, f"gather_{env[old].name}"
            )
        copy_meta(env[old], gather)
        tag(gather, collective="gather", placement="R", rule="output",
             why=f"the model returns this value; all-gather along dim {shard.dim}")  # fmt: skip
        out_node.replace_input_with(env[old], gather)
    for old in gm.graph.nodes:
        if old.op.startswith("call") and ops.op_name(old, gm) == "dropout":
            _stream_dropout(graph, gm, old, env[old], prop.placements[old])
    shared = {name: _held(s, tp) for name, s in prop.params.items()
              if s.replicas > 1 or s.part_replicas}  # fmt: skip
    if prop.scatters or shared:
        one_f_for_parameters(graph, gm, shared, sequence=bool(prop.scatters))
    for old, (src_sizes, dst_sizes) in prop.guards.items():  # sizes the proof read: per call
        x = env[old].args[0]
        with graph.inserting_after(env[old]):
            check = graph.call_function(
                check_sizes, (x, env[old], src_sizes, dst_sizes, describe_node(old))
            )
        tag(check, rule="propagation", placement="R",
            why="the reshape's split holds for these sizes only")  # fmt: skip

    graph.lint()
    return graph


def _held(s: Shard, tp: int) -> Held:
    """How the ranks hold a parameter split as `s`, whose gradients they sum (see
    CopyManyToTP): ranks per slice, or per run of parts held by different numbers."""
    return (s.dim, s.held(tp)) if s.part_replicas else s.replicas


def _reduce(
    graph: fx.Graph, env: dict[fx.Node, fx.Node], f_of: dict[fx.Node, fx.Node],
    value: fx.Node, readers: list[fx.Node], prop: Propagation, rule_of: dict[fx.Node, str],
) -> fx.Node:  # fmt: skip
    """g on the partial `value`, then its pending terms, read by `readers` (and by the
    value's f, which only ever serves readers of the sum); returns the sum. The g goes
    right after the node computing `value` in the serial graph, so it runs in the same
    grad mode; when that node is a deferred `p + r`, the g reads the partial tensor p
    passes through. With sequence parallelism a reduce-scatter takes g's place, and the
    terms join the rank's part of the sequence (a bias behind f, a replicated value cut
    to the rank's part)."""
    anchor = env[value]
    base = value
    while base in prop.deferred:
        base = prop.deferred[base]
    src = env[base]
    reading = {graph.output_node() if r.op == "output" else env[r] for r in readers}
    reading |= {f_of[value]} if value in f_of else set()
    # a fresh partial (a split linear's or lookup's output, a sum of them) read only whole
    # is reduced in place; a deferred chain's links each have one reader (propagation)
    kwargs: dict[str, Argument] = {"inplace": True} if set(anchor.users) <= reading else {}
    scatter = prop.scatters.get(value)
    with graph.inserting_after(anchor):
        if scatter is None:
            g = site(graph, G_MODULE, (src,), kwargs, f"g_{value.name}")
        else:
            g = site(graph, REDUCE_SCATTER_MODULE, (src, scatter.dim), {}, f"rs_{value.name}")
    rule = rule_of.get(base, "propagation")
    split = prop.splits.get(base)
    if split is not None and isinstance(split[1], EmbeddingInfo):
        why = "forward all-reduce: sums the ranks' partial lookups"
    elif split is not None:
        why = "forward all-reduce: the row-split linear produces partial sums"
    else:
        why = "forward all-reduce: one for a sum of partial results"
    if scatter is None:
        tag(g, collective="g", rule=rule, placement="R", why=why)
    else:
        why = why.replace("forward all-reduce", "forward reduce-scatter along the sequence")
        tag(g, collective="reduce_scatter", rule=rule, placement=str(scatter), why=why)
    copy_meta(src, g)
    out = g
    placement = prop.placements[value]
    assert isinstance(placement, Partial)
    for term in placement.pending:
        if isinstance(term, str):  # a row-split linear's bias
            with graph.inserting_after(out):
                t = graph.get_attr(term)
            tag(t, rule=rule, placement="R")
            why, last = "bias after the all-reduce", t
            trailing = -1 - _bias_dim(prop, term)  # a conv's bias: over dim -2
            if trailing:
                with graph.inserting_after(t):
                    last = t = graph.call_function(torch.reshape, (t, (-1,) + (1,) * trailing))
            if scatter is not None:  # added to a split sequence: its gradient is partial
                with graph.inserting_after(last):
                    last = t = site(graph, F_MODULE, (t,), {}, f"f_{t.name}")
                tag(t, collective="f", rule=rule, placement="R",
                     why="backward all-reduce: a bias added to a split sequence")  # fmt: skip
        elif scatter is not None and not isinstance(prop.placements[term], Shard):
            tv, sv = term.meta.get("val"), value.meta.get("val")
            # a replicated tensor added to a partial one (propagation's _keeps_partial),
            # whose sum is reduce-scattered: both tensors
            assert isinstance(tv, torch.Tensor) and isinstance(sv, torch.Tensor)
            dim = scatter.dim - (sv.dim() - tv.dim())  # broadcasting aligns trailing dims
            args: tuple[Argument, ...]
            with graph.inserting_after(out):
                if dim >= 0 and tv.shape[dim] != 1:
                    args, kind, what = (env[term], dim), SCATTER_MODULE, "scatter"
                    how = "this rank's part"
                else:  # broadcast along the sequence: whole, its gradient partial
                    args, kind, what = (env[term],), F_MODULE, "f"
                    how = "whole, behind f"
                last = t = site(graph, kind, args, {}, f"{what}_{term.name}")
            copy_meta(env[term], t)
            tag(t, collective=what, rule=rule, placement=str(scatter) if what == "scatter"
                 else "R", why=f"{term.name} added to a split sequence: {how}")  # fmt: skip
            why = f"{term.name} added once, after the reduce-scatter"
        else:
            t, last = env[term], out
            why = f"{t.name} added once, after the all-reduce"
        with graph.inserting_after(last):
            out = graph.call_function(operator.add, (out, t))
        copy_meta(src, out)
        tag(out, rule=rule, placement="R", why=why)
    for r in reading:
        r.replace_input_with(anchor, out)
    return out


def _bias_dim(prop: Propagation, bias: str) -> int:
    """The dimension a row-split layer's bias runs along (-1, or -2 for a conv)."""
    dims = {
        li.feature_dim
        for _, li in prop.splits.values()
        if isinstance(li, LinearInfo) and li.bias == bias  # an embedding has no bias
    }
    return dims.pop() if len(dims) == 1 else -1


def _cut(
    graph: fx.Graph,
    env: dict[fx.Node, fx.Node],
    f_of: dict[fx.Node, fx.Node],
    whole: dict[fx.Node, fx.Node],
    cut: Cut,
    tp: int,
) -> None:
    """The consumer reads this rank's slice of a replicated value (after its f, if any,
    or its all-gather, for a sequence-split value read whole)."""
    consumer = env[cut.consumer]
    src = env[cut.value]
    for other in (whole.get(cut.value), f_of.get(cut.value)):
        if other is not None and other in consumer.all_input_nodes:
            src = other
    s = cut.shard
    with graph.inserting_before(consumer):
        rank = graph.get_attr(RANK_BUFFER)
        mine = graph.call_function(
            rank_slice, (src, s.dim, s.parts, tp, rank, s.padded, s.replicas, cut.within)
        )
    copy_meta(cut.consumer, mine)
    v = src.meta.get("val")
    if isinstance(v, torch.Tensor):
        mine.meta["val"] = v  # the serial value (the views show serial shapes)
    held = "a replicated value" if cut.within is None else "the slice it holds"
    tag(mine, placement=str(s), why=f"this rank's slice of {held}; no communication")
    consumer.replace_input_with(src, mine)


def _erase_unused(graph: fx.Graph, node: fx.Node | None) -> None:
    """Erase `node` and then its inputs, as long as nothing reads them."""
    if node is None or node.users or node.op not in ("call_function", "call_method", "get_attr"):
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for a in inputs:
        _erase_unused(graph, a)


def _split_embedding(graph: fx.Graph, node: fx.Node, li: EmbeddingInfo, rule: str) -> fx.Node:
    with graph.inserting_before(node):
        w = graph.get_attr(li.weight)
        rank = graph.get_attr(RANK_BUFFER)
        ids = _get_path(node, (li.ids_index,))
        part = graph.call_function(vocab_embedding, (ids, w, rank, li.padding_idx))
    tag(w, rule=rule, placement=f"vocab shard of {li.weight}")
    copy_meta(node, part)
    tag(part, rule=rule, split="vocab", weight=li.weight, placement="P",
         why="rows of this rank's vocabulary slice, zeros for other ids")  # fmt: skip
    node.replace_all_uses_with(part)
    graph.erase_node(node)
    return part


def _vocab_parallel_loss(graph: fx.Graph, node: fx.Node, info: LossInfo) -> fx.Node:
    """cross_entropy(logits, target) -> max, terms, two sums, reduce (vocab.py)."""
    logits, target = _get_path(node, info.logits_at), _get_path(node, info.target_at)
    made = []
    with graph.inserting_before(node):
        rank = graph.get_attr(RANK_BUFFER)
        # the real vocabulary size, for masking padding columns; None when there are none
        vocab = info.vocab if info.padded != info.vocab else None
        local_max = graph.call_function(vocab_row_max, (logits, rank, vocab))
        row_max = site(graph, MAX_MODULE, (local_max,), {}, "row_max")
        terms = graph.call_function(vocab_ce_terms, (logits, row_max, target, rank, vocab))
        t_local = graph.call_function(operator.getitem, (terms, 0))
        s_local = graph.call_function(operator.getitem, (terms, 1))
        t = site(graph, G_MODULE, (t_local,), {}, "target_logit")
        s = site(graph, G_MODULE, (s_local,), {}, "sum_exp")
        loss = graph.call_function(
            vocab_ce_reduce, (s, t, target, info.ignore_index, info.reduction)
        )
        made = [local_max, row_max, terms, t_local, s_local, t, s, loss]
    rows = logits.meta.get("val")
    for new in made:
        copy_meta(node, new)
        tag(new, rule="vocab-parallel cross-entropy", placement="R")
    if isinstance(rows, torch.Tensor):  # batch x seq numbers each (for the views)
        per_row = torch.empty(rows.shape[:-1], dtype=rows.dtype, device="meta")
        for new in (local_max, row_max, t_local, s_local, t, s):
            new.meta["val"] = per_row
    for new, what in ((row_max, "max"), (t, "g"), (s, "g")):
        tag(new, collective=what, why=f"all-reduce of batch x seq numbers ({new.name})")
    node.replace_all_uses_with(loss)
    graph.erase_node(node)
    return loss


def _stream_dropout(
    graph: fx.Graph, gm: fx.GraphModule, old: fx.Node, node: fx.Node, placement: object
) -> None:
    """Dropout on a split value uses the rank's own stream, on a replicated value the
    stream shared by all ranks (random.py). Each call site gets a module of its own. A
    dropout module's site follows that module's own train()/eval() flag (copied when the
    rank module is built); a functional dropout keeps its `training` argument as traced
    (F.dropout's default is True, whatever the module's mode)."""
    call = canonical(old, gm, "dropout")
    p, training, inplace = call["p"], call["training"], bool(call["inplace"])
    owner = str(old.target) if old.op == "call_module" else None
    if owner is None:
        if isinstance(training, fx.Node) or isinstance(p, fx.Node):
            raise node_error(
                old, "dropout with a computed `p` or `training` argument",
                "pass Python values (a float p, training=self.training), so the choice is "
                "known when the model is planned",
            )  # fmt: skip
    if inplace and training is not False and p != 0.0:
        raise node_error(
            old, "in-place dropout: the parallel module computes dropout out of place",
            "use inplace=False (nn.Dropout(p) / F.dropout(x, p)); the result is the same",
        )  # fmt: skip
    stream = "rank" if isinstance(placement, Shard) else "shared"
    with graph.inserting_before(node):
        args = (node.args[0], p) if training is None else (node.args[0], p, bool(training))
        new = site(graph, DROPOUT_MODULES[stream], args, {}, node.name + "_")
    copy_meta(node, new)
    tag(new, placement=str(placement), dropout=stream, dropout_of=owner,
         why=f"dropout on a {'split' if stream == 'rank' else 'replicated'} value")  # fmt: skip
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _apply_edit(graph: fx.Graph, env: dict[fx.Node, fx.Node], e: ArgEdit, tp: int) -> None:
    node = graph.output_node() if e.node.op == "output" else env[e.node]
    if isinstance(e.new, (DivideByTP, MultiplyByTP)):
        src, by = env[e.new.source], tp
        if isinstance(e.new, DivideByTP):
            by = tp // e.new.replicas
            op, sign, placement = operator.floordiv, "//", "local"
            why = f"{src.name} is a serial size; the shard is 1/{by}"
        else:
            op, sign, placement = operator.mul, "*", "R"
            why = f"{src.name} is the local length of a split sequence"
        with graph.inserting_before(node):
            new = graph.call_function(op, (src, by))
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        tag(new, placement=placement, why=why)
        shown = f"{src.name} -> {src.name} {sign} {by}"
    else:
        new, shown = e.new, f"{e.old} -> {e.new}"
    _set_path(node, e.path, new)
    tag(node)
    record(node).edits.append(shown)
