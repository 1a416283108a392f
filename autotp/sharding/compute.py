"""Table entries for computation: elementwise ops, reductions, normalisation, matmul and
attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn

from ..match import ops
from ..match.call import Call
from .context import Ctx, check_replicated, ndim, param_names, val
from .placement import LocalInt, Partial, Placement, R, Shard


def _pointwise(c: Ctx, call: Call) -> Placement:
    """Elementwise with broadcasting: split operands must agree; replicated ones must
    broadcast along the split dimension (size 1), be parameters, which are then split, or
    are cut: each rank reads its slice (a per-head buffer such as ALiBi slopes, a bias
    buffer over the padded vocabulary)."""
    n = call.node
    out = val(n)
    if not isinstance(out, torch.Tensor):
        return _int_arith(c, call)
    nd = out.dim()
    split: Shard | None = None
    for a in call.leaves():
        pa = c.p(a)
        if isinstance(pa, LocalInt):
            raise c.refuse(n, "a local size is used as a value", "compute it from R values")
        if isinstance(pa, Shard):
            s = replace(pa, dim=pa.dim + nd - ndim(a))
            if split is not None and s != split:
                raise c.refuse(
                    n, f"operands are split differently ({split} and {s})",
                    "both operands must come from the same split block",
                )  # fmt: skip
            split = s
    if split is None:
        return R
    # a sequence split leaves parameters whole (a position table added to the sequence
    # is cut to the rank's positions, not stored split)
    sequence = any(isinstance(a, fx.Node) and c.reads_sequence(a, n) for a in call.leaves())
    for a in call.leaves():
        if not isinstance(a, fx.Node) or not isinstance(val(a), torch.Tensor):
            continue
        if c.p(a) != R:
            continue
        i = split.dim - (nd - ndim(a))
        shape = tuple(val(a).shape)
        if isinstance(c.pl[a], Partial):  # its sum, read by split compute
            if i < 0 or shape[i] == 1:  # broadcast (a mean over everything): its gradient
                c.needs_f(a, n)  # is each rank's part of the sum of the split one's
            continue
        if i >= 0 and shape[i] != 1:
            param = a.op == "get_attr" and str(a.target) in param_names(c.gm)
            if param and not sequence:
                c.shard_param(n, str(a.target), replace(split, dim=i))
                c.pl[a] = replace(split, dim=i)
                continue
            # R -> S: read this rank's slice (ALiBi slopes, a bias over the vocabulary)
            c.cut(a, n, replace(split, dim=i))
            continue
        c.needs_f(a, n)
    return split


def _inplace(c: Ctx, call: Call) -> Placement:
    """x.add_(y), x += y: the elementwise rule, and the result must be placed as x is: an
    in-place op cannot move x's elements between ranks."""
    x = call["0"]
    before = c.p(x)
    out = _pointwise(c, call)
    if out != before:
        raise c.refuse(
            call.node, f"in-place {call.op} would make {x.name} ({before}) {out}",
            "write it out of place (y = x + ...), or keep the op outside the split block",
        )  # fmt: skip
    return out


def _int_arith(c: Ctx, call: Call) -> Placement:
    n, name = call.node, call.op
    a = [c.p(x) for x in (call["0"], call["1"])]
    if not any(isinstance(x, LocalInt) for x in a):
        return R
    if any(isinstance(x, LocalInt) and x.padded for x in a):
        raise c.refuse(
            n, "arithmetic on the local size of a padded vocabulary",
            "use the vocabulary size from the config, or keep the output layer replicated",
        )  # fmt: skip
    local = next(x for x in a if isinstance(x, LocalInt))  # of one split, or refused
    if name in ("add", "sub") and a[0] == a[1]:
        return local
    if name == "mul" and sum(isinstance(x, LocalInt) for x in a) == 1:
        return local
    if name in ("floordiv", "div") and isinstance(a[0], LocalInt) and a[1] == R:
        serial, divisor = val(call["0"]), val(call["1"])
        if serial % (divisor * c.tp) == 0:
            return local
    raise c.refuse(
        n, f"cannot tell what '{name}' of a local size is on each rank",
        "compute sizes from replicated values (config fields, sizes of unsplit tensors)",
    )  # fmt: skip


def _mean(c: Ctx, call: Call) -> Placement:
    x, dims = call.input, call["dim"]
    px = c.p(x)
    if not isinstance(px, Shard):
        return check_replicated(c, call, "input")
    if dims is None or isinstance(dims, int) or len(dims) == 0:
        dims = [dims] if isinstance(dims, int) else list(range(ndim(x)))  # () and [] mean all
    if px.dim in dims:
        return _mean_of_slices(c, call, px)
    if call["keepdim"]:
        return px
    return replace(px, dim=px.dim - sum(d < px.dim for d in set(dims)))


def _mean_of_slices(c: Ctx, call: Call, px: Shard) -> Placement:
    """A mean or sum over the split dimension (an RMSNorm over split features: OLMo 2's
    q/k norm): each rank's mean of its slice, divided by tp, is its summand of the serial
    mean, where every rank holds an equal share of the dimension (slices held by several
    ranks count once each: sum_r m_r / tp = sum_s m_s / (tp / replicas)); each rank's
    sum of its slice, divided by the ranks holding it, is its summand of the serial sum.
    So the value is partial: one all-reduce where it is read whole."""
    if px.padded is not None or px.sections or c.region[call.input] != c.region[call.node]:
        raise c.refuse(
            call.node, f"reduction over the split dimension {px.dim} of a value split as "
            f"{px}", "no rule for a mean over padded or unequal parts",
        )  # fmt: skip
    if not isinstance(val(call.node), torch.Tensor) or not val(call.node).is_floating_point():
        raise c.refuse(call.node, f"reduction over the split dimension {px.dim}",
                       "no rule for this")  # fmt: skip
    c.means[call.node] = c.tp if call.op == "mean" else px.replicas
    return Partial()


def _assert(c: Ctx, call: Call) -> Placement:
    return R  # aten._assert_tensor_metadata checks dtype/device/layout: true of a shard too


def _reduce_over(c: Ctx, call: Call, dims: set[int]) -> Placement:
    px = c.p(call.input)
    if not isinstance(px, Shard):
        return check_replicated(c, call, "input")
    if px.dim in dims:
        raise c.refuse(
            call.node, f"{call.op} over the split dimension {px.dim}",
            "this op needs the whole dimension; no propagation rule for a split here",
        )  # fmt: skip
    check_replicated(c, call, "input", consumer_split=True)
    return px


def _softmax(c: Ctx, call: Call) -> Placement:
    d, nd = call["dim"], ndim(call.node)
    if d is None:  # torch's implicit choice (deprecated): dim 0 for 0-, 1- and 3-d, else 1
        d = 0 if nd in (0, 1, 3) else 1
    if not isinstance(d, int):
        raise c.refuse(call.node, "a softmax over a computed dimension", "pass dim as an int")
    return _reduce_over(c, call, {d})


def _layer_norm(c: Ctx, call: Call) -> Placement:
    nd, shape = ndim(call.node), call["normalized_shape"]
    k = len(val(shape)) if isinstance(shape, fx.Node) else len(shape)
    out = _reduce_over(c, call, set(range(nd - k, nd)))
    if call.module is not None and isinstance(out, Shard):
        if type(call.module) is not nn.LayerNorm:
            if any(True for _ in call.module.parameters()):
                raise c.refuse(
                    call.node, "a norm module with weights applied to a split value",
                    "normalise replicated values, or use F.layer_norm with explicit weights",
                )  # fmt: skip
        else:  # run as F.layer_norm, its weights behind f (sequence.py)
            c.functional_norms.add(call.node)
    return out


def _matmul(c: Ctx, call: Call) -> Placement:
    n, a, b = call.node, call.input, call["other"]
    pa, pb = c.p(a), c.p(b)
    if not (isinstance(pa, Shard) or isinstance(pb, Shard)):
        return R
    na, nb, no = ndim(a), ndim(b), ndim(n)
    if min(na, nb) < 2:
        raise c.refuse(n, "matmul of a split vector", "no rule for a split here")
    if (isinstance(pa, Shard) and pa.dim == na - 1) or (isinstance(pb, Shard) and pb.dim == nb - 2):
        raise c.refuse(
            n, "matmul over a split contraction dimension would need a partial sum",
            "split the producing linear by columns so heads stay whole, or keep it replicated",
        )  # fmt: skip
    found: dict[fx.Node, Shard] = {}
    for x, px, nx_ in ((a, pa, na), (b, pb, nb)):
        if not isinstance(px, Shard):
            continue
        if px.dim == nx_ - 2 and x is a:
            found[x] = replace(px, dim=no - 2)
        elif px.dim == nx_ - 1 and x is b:
            found[x] = replace(px, dim=no - 1)
        else:
            found[x] = replace(px, dim=px.dim + no - nx_)
    out = min(found.values(), key=lambda s: s.replicas)  # the narrower: the other is cut
    for x, s in found.items():
        i = s.dim - (no - ndim(x))
        if not c.cut_within(x, n, replace(s, dim=i), replace(out, dim=i)):
            raise c.refuse(n, f"operands split differently ({out}, {s})", "split both by heads")
    for x, px, nx_ in ((a, pa, na), (b, pb, nb)):
        if px == R:
            i = out.dim - (no - nx_)
            if out.dim < no - 2 and i >= 0 and val(x).shape[i] != 1:
                c.cut(x, n, replace(out, dim=i))  # a per-head operand: this rank's heads
                continue
            c.needs_f(x, n)
    return out


def _sdpa(c: Ctx, call: Call) -> Placement:
    """q, k and v split by heads alike; a replicated one is cut to the rank's heads (the
    key/value projections left whole, Megatron's choice for fewer key/value heads than
    ranks). With `enable_gqa` each query head reads key/value head h // (H / KV), so a
    rank whose query heads all share one key/value head reads that one."""
    n, q, k, v = call.node, call["query"], call["key"], call["value"]
    ps = [c.p(q), c.p(k), c.p(v)]
    shards = [p for p in ps if isinstance(p, Shard)]
    if not shards:
        return check_replicated(c, call, "query", "key", "value")
    nd = ndim(q)
    split = min(shards, key=lambda p: p.replicas)
    if split.dim >= nd - 2 or split.replicas > 1 or not _aligned(c, call, ps, split):
        raise c.refuse(
            n, f"attention inputs split as {[str(p) for p in ps]}",
            "q, k and v must all be split by heads (a dimension before the last two)",
        )  # fmt: skip
    for x, p in zip((q, k, v), ps, strict=True):
        if p == R:
            c.cut(x, n, _heads_of(c, call, x, split))
    mask = call["attn_mask"]
    if isinstance(mask, fx.Node):
        pm = c.p(mask)
        i = split.dim - (nd - ndim(mask))
        if pm not in (R, split):
            raise c.refuse(n, f"the mask is split as {pm}", "split the mask by heads")
        if pm == R and i >= 0 and val(mask).shape[i] != 1:
            c.cut(mask, n, replace(split, dim=i))  # a per-head mask: this rank's heads
        elif pm == R:
            c.needs_f(mask, n)
    return split


def _aligned(c: Ctx, call: Call, ps: list[Placement], split: Shard) -> bool:
    """Is each split one of q, k and v the rank's heads under `split`, or a slice of key/
    value heads held by several ranks that holds them (then cut to them)?"""
    for x, p in zip((call["query"], call["key"], call["value"]), ps, strict=True):
        if p == R or p == split:
            continue
        if not isinstance(p, Shard) or (p.dim, p.parts) != (split.dim, split.parts):
            return False
        if not c.cut_within(x, call.node, p, _heads_of(c, call, x, split)):
            return False
    return True


def _heads_of(c: Ctx, call: Call, x: fx.Node, split: Shard) -> Shard:
    """How the rank's slice of a replicated q, k or v is cut, given the split of the
    others: its own heads, or with grouped-query attention the key/value heads its query
    heads read."""
    heads, q_heads = val(x).shape[split.dim], val(call["query"]).shape[split.dim]
    if split.parts == 1 and heads % c.tp == 0:
        return split
    gqa = call["enable_gqa"] and x is not call["query"] and q_heads % heads == 0
    if gqa and split.parts == 1 and c.tp % heads == 0 and q_heads % c.tp == 0:
        return replace(split, replicas=c.tp // heads)
    raise c.refuse(
        call.node, f"{x.name} has {heads} heads, which cannot follow the split of the "
        f"others ({split}) over {c.tp} ranks",
        "choose tp dividing the number of heads (or of key/value heads)",
    )  # fmt: skip


RULES: dict[str, Callable[[Ctx, Call], Placement]] = {
    **{name: _pointwise for name in ops.POINTWISE},  # broadcasting elementwise
    **{name: _inplace for name in ops.INPLACE},  # elementwise, x keeps its placement
    "floordiv": _int_arith,  # ints only
    "softmax": _softmax,  # fine unless over the split dim
    "log_softmax": _softmax,  # fine unless over the split dim
    "layer_norm": _layer_norm,  # fine unless over the split dim
    "matmul": _matmul,  # batch dims split alike (heads); never over the contraction dim
    "sdpa": _sdpa,  # q, k, v split by heads alike
    "mean": _mean,  # over replicated dimensions only
    "sum": _mean,  # over replicated dimensions only
    "assert": _assert,  # metadata checks hold for shards
}
