"""Stage 3, sharding propagation: a placement for every node, and the shape constants and
communication it implies.

Each op call is first canonicalised into a record (call.py: one op name, arguments by
name, whatever the spelling), and the rule table has one entry per normalised op: a
strategy over that record, gathered from layout.py, compute.py and layers.py. An op whose
inputs are all R is replicated compute and always correct, so only ops touched by a split
value need an entry; a split value reaching an op with no entry is refused, naming it.

Communication falls out of the placements, through one redistribution step in the driver:
a partial value (P) read by any op but the sum of two partials is reduced (one g per
value, shared by its readers, then its pending biases); a replicated value that carries a
gradient and enters split compute gets one f (its gradient is a partial sum); a replicated
value meeting split compute along a dimension it spans is cut to the rank's slice.
rewrite.py inserts all three from the Propagation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from ..capture.trace import restore_grad, set_grad
from ..common.errors import AutoTPError, node_error
from ..common.tensor_names import names_by_tensor
from ..match import ops
from ..match.call import Call, canonical
from ..match.patterns import EmbeddingInfo, LinearInfo
from ..match.rule import Split
from . import compute, layers, layout
from .context import Ctx, param_names, replicated_like, val
from .placement import (
    LocalInt,
    Partial,
    Placement,
    Propagation,
    R,
    Shard,
    VocabOptions,
    is_split,
)

__all__ = ["propagate"]

_TABLE: dict[str, Callable[[Ctx, Call], Placement]] = {
    **compute.RULES, **layout.RULES, **layers.RULES,
}  # fmt: skip


def propagate(
    gm: fx.GraphModule,
    tp: int,
    linears: dict[fx.Node, LinearInfo],
    splits: dict[fx.Node, tuple[Split, LinearInfo | EmbeddingInfo]],
    options: VocabOptions | None = None,
    rule_names: dict[fx.Node, str] | None = None,
    inputs: dict[str, Placement] | None = None,
    sequence_parallel: bool = False,
) -> Propagation:
    """Placements for every node of `gm` given the layer splits; refuses what it cannot
    prove. Pure: `gm` is not modified. `rule_names` names the rule behind each split
    layer, for error messages; `inputs` the placement of inputs that arrive split (by
    placeholder name; the rest are replicated).

    `sequence_parallel`: the sum of a partial value is split along its sequence (a
    reduce-scatter, not an all-reduce), and what follows stays split as long as table
    entries prove it can (norms, dropout, residuals: per-token compute); a node whose
    entry refuses a sequence-split input reads it whole instead (an all-gather), so the
    column-split linear of the next block reads the whole sequence, as in Megatron-LM."""
    c = Ctx(gm, tp, splits, linears, options or VocabOptions())
    c.rule_names = rule_names or {}
    c.sequence = sequence_parallel and tp > 1
    region = 0
    for n in gm.graph.nodes:
        value = val(n)
        if n.op == "call_function" and n.target in (set_grad, restore_grad):
            region += 1  # a no_grad / enable_grad boundary: partials do not cross it
        c.region[n] = region
        c.grad[n] = _carries_grad(gm, n, c.grad)
        if n.op == "placeholder":
            c.pl[n] = (inputs or {}).get(n.name) or replicated_like(value)
            if c.sequence and n.name in c.options.sequence_inputs:
                c.pl[n] = Shard(1)  # the previous layer's hidden state, handed over
                c.seq.add(n)
            continue
        if n.op == "get_attr":
            c.pl[n] = R
            continue
        c.current = n
        if not c.sequence or not any(
            c.reads_sequence(a, n) or isinstance(c.pl.get(a), Partial) for a in n.all_input_nodes
        ):
            _place(c, n)
            continue
        before = c.snapshot()
        try:
            _place_sequence(c, n)
        except AutoTPError:  # read the sequence-split inputs whole, and try again: first
            # the serial lengths only (x.new_ones(T, T)), then the values too
            for sizes_only in (True, False):
                c.restore(before)
                if not c.gather_sequence(n, sizes_only):
                    if sizes_only:
                        continue
                    raise
                try:
                    _place_sequence(c, n)
                    break
                except AutoTPError:
                    if not sizes_only:
                        raise
        split_in = [a for a in n.all_input_nodes if is_split(c.seen(a, n))]
        if is_split(c.pl[n]) and split_in and all(c.reads_sequence(a, n) for a in split_in):
            c.seq.add(n)
    _check_split_params_used_only_split(c)
    for a, shard in list(c.scatters.items()):  # read whole by all: one all-reduce instead
        if shard is None or set(c.reduces[a]) <= set(c.sequence_gathers.get(a, ())):
            del c.scatters[a]
            c.sequence_gathers.pop(a, None)
    scatters = {a: shard for a, shard in c.scatters.items() if shard is not None}  # all, now
    return Propagation(
        c.pl, c.params, c.f_inputs, c.edits, splits, c.param_users, c.losses, c.gathers,
        c.options.gather_outputs, c.reduces, c.deferred, c.cuts,
        c.options.local_outputs + tuple(c.handed),
        scatters, c.sequence_gathers, c.functional_norms, c.guards, tuple(c.handed),
        c.means,
    )  # fmt: skip


def _place_sequence(c: Ctx, n: fx.Node) -> None:
    """_place, for a node reading a sequence split: what stays split along the sequence
    must stay one plain split, which an all-gather can undo (a reshape of [B, T/tp] into
    [B*T] holds B parts of the rank's tokens: read the whole sequence there instead)."""
    _place(c, n)
    if not any(c.reads_sequence(a, n) for a in n.all_input_nodes):
        return
    out = c.pl[n]
    for p in out if isinstance(out, tuple) else (out,):
        plain = Shard(p.dim) if isinstance(p, Shard) else p
        if p != plain:
            raise c.refuse(n, f"a sequence split becomes {p}", "read the sequence whole")


def _place(c: Ctx, n: fx.Node) -> None:
    """The placement of `n`, from its table entry (or replicated compute)."""
    gm, linears, splits = c.gm, c.linears, c.splits
    value = val(n)
    name = "linear" if n in linears else ops.op_name(n, gm)
    if name in ("linear", "addmm") and n not in linears:
        name = "computed linear"  # a weight that is not a parameter: no rule, as any op
    call = canonical(n, gm, name)
    partial = [a for a in n.all_input_nodes if isinstance(c.pl.get(a), Partial)]
    if partial and c.sequence:
        for a in n.all_input_nodes:  # a partial value's shape is serial: so must sizes be
            if isinstance(c.seen(a, n), LocalInt) and c.reads_sequence(a, n):
                raise c.refuse(
                    n, f"{a.name}, a rank's length of a split sequence, shapes a whole one",
                    "read the length from a value that is not split along the sequence",
                )  # fmt: skip
    if partial:
        kept = _keeps_partial(c, call)
        if kept is not None:
            c.pl[n] = kept
            return
        if name.endswith("_"):  # in place (ops.INPLACE, aten add_, relu_, ...): other
            # readers of the partial value would miss the change
            raise c.refuse(
                n, f"in-place {name} on a partial value (a row-split linear's output "
                "before its all-reduce)", "write it out of place (y = x + ...)",
            )  # fmt: skip
        for a in partial:  # P -> R: this node reads the sum
            c.reduce(a, n)
    args_split = any(is_split(c.p(a)) for a in call.leaves())
    unequal = [a for a in n.all_input_nodes if getattr(c.pl.get(a), "sections", ())]
    if unequal and name not in ("getitem", "slice"):  # only _section knows them
        raise c.refuse(
            n, f"{unequal[0].name}, split in unequal parts ({c.pl[unequal[0]]}), "
            f"reaches '{name}'", "slice the fused output into its parts first",
        )  # fmt: skip
    rule = _TABLE.get(name)
    if (
        n in linears
        or n in splits
        or (rule is not None and (args_split or name in ("view", "split")))
    ):
        c.pl[n] = _apply_rule(c, call, rule) if rule else R
    elif not args_split:
        c.pl[n] = replicated_like(value)  # replicated compute is always correct
    else:
        raise node_error(
            n,
            f"a split value reaches '{name}', which has no sharding propagation rule",
            "keep this op outside split blocks (before the column-split linear or after "
            "the row-split one), or file an issue to add a rule for it",
        )


def _keeps_partial(c: Ctx, call: Call) -> Partial | None:
    """What stays partial, or None where `n` reads the sum:
    - `a + b` of two partial values: one all-reduce serves both (a parallel attention +
      MLP block);
    - `a + b` of a partial value read only here and a replicated tensor of its shape (a
      residual, a bias added by its own op): that term is added once, after the sum;
    - `a += b` as either, when nothing reads `a` again (Falcon's `mlp_output +=
      attention_output`);
    - a dropout of a partial value with nothing pending: its mask, from the stream the
      ranks share, is the same on every rank, and dropout is linear in its input."""
    n, name = call.node, call.op
    kept = _linear_of_partial(c, call)
    if kept is not None:
        return kept
    if name == "dropout":
        x = call.input
        px = c.pl.get(x) if isinstance(x, fx.Node) else None
        if isinstance(px, Partial) and not px.pending and not any(
            isinstance(a, fx.Node) for a in call.others("input")
        ) and c.region[x] == c.region[n]:  # fmt: skip
            return Partial()
        return None
    if name not in ("add", "add_") or set(call.args) != {"0", "1"}:
        return None
    if name == "add_" and (not isinstance(n.args[0], fx.Node) or len(n.args[0].users) != 1):
        return None  # x += y where x is read again: the change must be seen there
    out = val(n)
    nodes = [a for a in n.args if isinstance(a, fx.Node)]
    if not isinstance(out, torch.Tensor) or len(nodes) != len(n.args):
        return None
    a, b = nodes
    if c.region[a] != c.region[n] or c.region[b] != c.region[n]:
        return None  # the sum, and a linear's bias, stay in the grad mode they ran in
    pa, pb = c.pl[a], c.pl[b]
    if isinstance(pa, Partial) and isinstance(pb, Partial):
        same = val(a).shape == val(b).shape == out.shape
        return Partial(pa.pending + pb.pending) if same else None
    p, r = (a, b) if isinstance(pa, Partial) else (b, a)
    pp = c.pl[p]
    if not isinstance(pp, Partial) or c.pl[r] != R or not isinstance(val(r), torch.Tensor):
        return None
    vp = val(p)
    if len(p.users) != 1 or vp.shape != out.shape or vp.dtype != out.dtype:
        return None
    c.deferred[n] = p
    return Partial((*pp.pending, r))


# Linear maps of one value: applied to each rank's summand, they give a summand of the
# result (sum_r f(p_r) = f(sum_r p_r)), so the value stays partial through them.
_LINEAR = frozenset(
    "identity view flatten squeeze unsqueeze transpose permute sum mean neg".split()
)


def _linear_of_partial(c: Ctx, call: Call) -> Partial | None:
    """P through a linear map stays P, where nothing is pending (a bias or residual would
    be transformed too): a reshape, a transpose, a sum or mean, a negation, or a product
    with (or quotient by) a replicated value, whose gradient is then partial, so it gets
    f (MoE routing weights; a gate on a shared expert's output). Only along a chain (the
    partial value read by this op alone), so the sum is still taken once, but later:
    after the experts' outputs are combined rather than before."""
    n, name = call.node, call.op
    x = call["0"] if name in ("mul", "div", "neg") else call.input
    px = c.pl.get(x) if isinstance(x, fx.Node) else None
    if name == "mul" and not isinstance(px, Partial):
        x = call["1"]
        px = c.pl.get(x) if isinstance(x, fx.Node) else None
    if not isinstance(px, Partial) or c.region[x] != c.region[n]:
        return None
    if len(x.users) != 1:  # read elsewhere too: one sum there serves both
        return None
    if px.pending:  # biases over the features, which a reshape keeping them leaves alone
        biases: dict[str | fx.Node, int] = {
            li.bias: li.feature_dim for li in c.linears.values() if li.bias
        }
        keeps = name in ("view", "flatten") and val(n).shape[-1:] == val(x).shape[-1:]
        if keeps and all(biases.get(t) == -1 for t in px.pending):
            return Partial(px.pending)  # Conv1D's addmm on [B*T, C], viewed as [B, T, C]
        return None
    if name not in _LINEAR and name not in ("mul", "div"):
        return None
    if not isinstance(val(n), torch.Tensor) or val(n).dtype != val(x).dtype:
        return None  # a cast would round each summand, not the sum
    others = [a for a in call.leaves() if a is not x]
    if any(isinstance(a, fx.Node) and c.pl.get(a) != R for a in others):
        return None  # a second partial (a product of sums), a split or local size
    if name in ("mul", "div"):
        if set(call.args) != {"0", "1"} or (name == "div" and x is not call["0"]):
            return None
        for a in others:
            c.needs_f(a, n)
    return Partial()


def _apply_rule(c: Ctx, call: Call, rule: Callable[[Ctx, Call], Placement]) -> Placement:
    """A table entry's placement for the call. An entry that cannot read this spelling of
    the call (an argument form it does not know) refuses the node rather than crash."""
    n, name = call.node, call.op
    try:
        return rule(c, call)
    except AutoTPError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown means refuse
        raise node_error(
            n,
            f"autotp's rule for '{name}' cannot read this call ({type(e).__name__}: {e})",
            "spell the call the usual way (positional arguments as in the PyTorch docs), "
            "or keep it outside split blocks; please report the model",
        ) from e


def _check_split_params_used_only_split(c: Ctx) -> None:
    """A split parameter must reach nothing but the ops that use its shard: any other use,
    under any of its names (tied weights), would read a shard as if it were whole."""
    aliases = names_by_tensor(c.gm, buffers=False)
    readers: dict[str, list[fx.Node]] = {}  # parameter name -> nodes reading it
    for n in c.gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(str(n.target), []).extend(n.users)
        elif n.op == "call_module" and n not in c.splits:
            mod = c.gm.get_submodule(str(n.target))
            for k, _ in mod.named_parameters():
                readers.setdefault(f"{n.target}.{k}", []).append(n)
    for name in list(c.params):
        names = aliases[id(c.gm.get_parameter(name))]
        for alias in names:
            for user in readers.get(alias, []):
                if not any((a, user) in c.split_uses for a in names):
                    raise _conflict(c, user, name)


def _conflict(c: Ctx, user: fx.Node, name: str) -> Exception:
    return node_error(
        user,
        f"parameter {name} is split ({c.params[name]}) for {c.param_users[name].name} but "
        "this node uses it whole",
        "a weight shared between a split layer and another use (e.g. tied embeddings) "
        "cannot be split; untie it, or leave one of the layers unmatched",
    )


def _carries_grad(gm: fx.GraphModule, n: fx.Node, grad: dict[fx.Node, bool]) -> bool:
    """Could `n` carry a gradient? Parameters and floating-point inputs do, and what
    depends on them; a tuple does when a floating tensor in it does (chunk, split)."""
    v = val(n)
    if n.op == "get_attr":
        return str(n.target) in param_names(gm)
    if not _differentiable(v):
        return False
    if n.op == "placeholder":
        return True
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if any(p.requires_grad for p in mod.parameters()):
            return True
    return any(grad.get(a, False) for a in n.all_input_nodes)


def _differentiable(v: object) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_floating_point() or v.is_complex()
    if isinstance(v, (list, tuple)):
        return any(_differentiable(x) for x in v)
    if isinstance(v, dict):
        return any(_differentiable(x) for x in v.values())
    return False
