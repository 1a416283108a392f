"""Table entries for layout: views, reshapes, transposes, indexing, splits and joins.

Shape constants are rewritten by provenance, never by value: the view/split entries know
which output dimension carries the split and rewrite exactly the argument for that
dimension: a literal is divided, an int computed from replicated sizes gets a `// tp`, an
int computed from local sizes stays, and -1 stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.fx as fx

from ..match.call import Call
from .context import Ctx, ndim, slice_span, val
from .placement import ArgEdit, DivideByTP, LocalInt, Placement, R, Shard, is_split


def _identity(c: Ctx, call: Call) -> Placement:
    return c.p(call.input)


def _size(c: Ctx, call: Call) -> Placement:
    dims = _shape_of(c, call.input)
    return dims if call["dim"] is None else dims[call["dim"]]


# Attributes that are the same on a shard as on the whole tensor.
_META_ATTRS = frozenset(
    "dtype device ndim is_cuda is_meta requires_grad layout is_sparse is_quantized".split()
)


def _new_tensor(c: Ctx, call: Call) -> Placement:
    """x.new_ones(sizes) and its kin read only x's dtype and device: replicated, given
    replicated sizes."""
    x = call.node.args[0] if call.node.args else None
    for a in call.leaves():
        if a is not x and isinstance(a, fx.Node) and is_split(c.p(a)):
            raise c.refuse(
                call.node, f"{call.op} with a split size ({a.name}: {c.p(a)})",
                "give it replicated sizes",
            )  # fmt: skip
    return R


def _getattr(c: Ctx, call: Call) -> Placement:
    """x.shape like size(); metadata attributes are replicated; any other attribute of a
    split value (.T, .mT, .data, .real, ...) has no rule and is refused."""
    attr = call["name"]
    if attr == "shape":
        return _shape_of(c, call.input)
    if attr in _META_ATTRS or not is_split(c.p(call.input)):
        return R
    raise c.refuse(
        call.node, f"attribute .{attr} of a split value has no sharding rule",
        "use an explicit op autotp knows (x.transpose(-2, -1) for .T / .mT, x.detach() for "
        ".data), or compute this outside the split block",
    )  # fmt: skip


def _shape_of(c: Ctx, x: fx.Node) -> tuple[Placement, ...]:
    px = c.p(x)
    return tuple(_local_int(px) if isinstance(px, Shard) and px.dim == i else R
                 for i in range(ndim(x)))  # fmt: skip


def _section(c: Ctx, call: Call, px: Shard) -> Placement:
    """A slice that is exactly one part of a fused output split in unequal parts: this
    rank's slice of that part, with the slice bounds made local (each part before it
    holds its slice on every rank: 1/tp of it, or of tp / the ranks holding each)."""
    n, size = call.node, val(call.input).shape[px.dim]
    span = slice_span(c, call, px.dim, size)
    pieces = px.pieces(size)
    if span is None or (span[0], span[1] - span[0]) not in pieces:
        raise c.refuse(
            n, f"a value split as {px} is read other than one of its parts",
            "slice the fused output into its parts (q, k, v) before anything else",
        )  # fmt: skip
    if call.op == "slice":
        where = {"start": call.path("start") if "start" in call.paths else None,
                 "end": call.path("end") if "end" in call.paths else None}  # fmt: skip
        bounds = {"start": call["start"], "end": call["end"]}
    else:
        idx = call["index"]
        items = idx if isinstance(idx, tuple) else (idx,)
        k = next(i for i, it in enumerate(items) if isinstance(it, slice) and it != slice(None))
        at = (*call.path("index"), k) if isinstance(idx, tuple) else call.path("index")
        bounds = {"start": items[k].start, "end": items[k].stop}
        where = {"start": (*at, "start"), "end": (*at, "stop")}
    # each serial bound of a part -> where that part starts (ends) in a rank's slice
    local: dict[int, int] = {}
    mine = 0
    for (start, length), (lo, hi) in zip(pieces, px.ranges(size, 0, c.tp), strict=True):
        local[start] = mine
        mine += hi - lo
        local[start + length] = mine
    for key, b in bounds.items():
        at_key = where[key]
        if isinstance(b, int) and 0 < b < size and at_key is not None:
            c.edits.append(ArgEdit(n, at_key, b, local[b]))
    return Shard(px.dim, replicas=px.replicas_of(pieces.index((span[0], span[1] - span[0]))))


def _getitem(c: Ctx, call: Call) -> Placement:
    n, base, idx = call.node, call.input, call["index"]
    pb = c.p(base)
    if isinstance(pb, Shard) and pb.sections:
        return _section(c, call, pb)
    if isinstance(pb, tuple):  # a tuple of values (split outputs, sizes)
        if isinstance(idx, slice):
            return pb[idx]
        if isinstance(idx, int):
            return pb[idx]
        raise c.refuse(n, "indexing a tuple with a computed index", "use a literal index")
    if not isinstance(val(base), torch.Tensor):
        return R
    items = idx if isinstance(idx, tuple) else (idx,)
    for it in items:  # slice bounds must be serial values
        parts = (it.start, it.stop, it.step) if isinstance(it, slice) else (it,)
        if any(isinstance(c.p(x), LocalInt) for x in parts if isinstance(x, fx.Node)):
            raise c.refuse(n, "a slice bound is a local size", "slice with replicated sizes")
    if pb == R:
        if any(isinstance(x, fx.Node) and is_split(c.p(x)) for x in call.others("input")):
            raise c.refuse(n, "indexing with a split index", "index with replicated values")
        return R
    # a tensor read split (a partial one is read as its sum: the driver reduces it first)
    assert isinstance(pb, Shard), f"a split tensor is a Shard, not {pb}"
    # A split tensor: ints, slices, None and ..., plus at most one 1-D integer index (a
    # list of ints, or a replicated integer tensor: its result dimension stays in place);
    # only full slices may touch the split dimension.
    advanced = [it for it in items if _is_gather_index(c, it)]
    for it in items:
        basic = it is None or it is Ellipsis or isinstance(it, slice)
        basic = basic or (isinstance(it, int) and not isinstance(it, bool))
        basic = basic or (isinstance(it, fx.Node) and isinstance(val(it), int))
        if not basic and not (len(advanced) == 1 and it is advanced[0]):
            raise c.refuse(
                n, f"index {it!r} ({type(val(it)).__name__}) into a split value",
                "index split values with ints, slices and one list or integer tensor of "
                "replicated positions; gather otherwise outside the split block",
            )  # fmt: skip
    nd = ndim(base)
    n_explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
    in_dim, out_dim = 0, 0
    for it in items:
        if it is Ellipsis:
            skip = nd - n_explicit
            if in_dim <= pb.dim < in_dim + skip:
                return replace(pb, dim=out_dim + pb.dim - in_dim)
            in_dim += skip
            out_dim += skip
            continue
        if it is None:
            out_dim += 1
            continue
        if in_dim == pb.dim:
            if isinstance(it, slice) and it == slice(None):
                return replace(pb, dim=out_dim)
            raise c.refuse(
                n, f"indexing {it!r} along the split dimension {pb.dim}",
                "index only replicated dimensions of a split tensor",
            )  # fmt: skip
        if isinstance(it, slice) or (advanced and it is advanced[0]):
            out_dim += 1
        in_dim += 1
    return replace(pb, dim=out_dim + pb.dim - in_dim)


def _is_gather_index(c: Ctx, it: object) -> bool:
    """A list of ints, or a 1-D integer tensor that is the same on every rank."""
    if isinstance(it, list):
        return bool(it) and all(isinstance(i, int) and not isinstance(i, bool) for i in it)
    if isinstance(it, fx.Node):
        v = val(it)
        integer = isinstance(v, torch.Tensor) and not v.is_floating_point()
        return integer and v.dtype != torch.bool and v.dim() == 1 and c.p(it) == R
    return False


def _index(c: Ctx, call: Call) -> Placement:
    """aten.index(x, [None, ..., idx, ...]): one 1-D integer index tensor of replicated
    positions, on a dimension that is not split; its result dimension stays in place."""
    n, x, indices = call.node, call.input, call["indices"]
    px = c.p(x)
    if not isinstance(px, Shard):
        if any(isinstance(i, fx.Node) and is_split(c.p(i)) for i in indices):
            raise c.refuse(n, "indexing with a split index", "index with replicated values")
        return R
    tensors = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(tensors) != 1 or not _is_gather_index(c, tensors[0][1]):
        raise c.refuse(
            n, "an advanced index into a split value other than one 1-D integer index",
            "gather with one list or integer tensor, or outside the split block",
        )  # fmt: skip
    if tensors[0][0] == px.dim:
        raise c.refuse(
            n, f"indexing along the split dimension {px.dim}",
            "index only replicated dimensions of a split tensor",
        )  # fmt: skip
    return px


def _transpose(c: Ctx, call: Call) -> Placement:
    px = c.p(call.input)
    if not isinstance(px, Shard):
        return R
    d0, d1 = call["dim0"], call["dim1"]
    return replace(px, dim={d0: d1, d1: d0}.get(px.dim, px.dim))


def _permute(c: Ctx, call: Call) -> Placement:
    px = c.p(call.input)
    if not isinstance(px, Shard):
        return R
    return replace(px, dim=list(call["dims"]).index(px.dim))


def _unsqueeze(c: Ctx, call: Call) -> Placement:
    px = c.p(call.input)
    if not isinstance(px, Shard):
        return R
    d = call["dim"]
    return replace(px, dim=px.dim + 1 if d <= px.dim else px.dim)


def _squeeze(c: Ctx, call: Call) -> Placement:
    """The split shifts past the size-1 dimensions removed before it (dim: one, a list, or
    None for all of them); a split dimension is never of size 1."""
    px = c.p(call.input)
    if not isinstance(px, Shard):
        return R
    shape, d = list(val(call.input).shape), call["dim"]
    dims = range(len(shape)) if d is None else [d] if isinstance(d, int) else d
    gone = [i for i in dims if shape[i] == 1]
    local = (px.padded or shape[px.dim]) // px.slices(c.tp)
    if px.dim in gone or (px.dim in dims and local == 1):  # a rank's slice of size 1 goes
        raise c.refuse(
            call.node, f"squeezing the split dimension {px.dim} ({local} per rank)",
            "squeeze the dimensions you mean by number, not the split one",
        )  # fmt: skip
    return replace(px, dim=px.dim - sum(i < px.dim for i in gone))


def _unbind(c: Ctx, call: Call) -> Placement:
    """One value per index of a replicated dimension; the split shifts past it."""
    px, d, k = c.p(call.input), call["dim"], len(val(call.node))
    if not isinstance(px, Shard):
        return tuple(R for _ in range(k))
    if d == px.dim:
        raise c.refuse(call.node, f"unbinding the split dimension {d}", "unbind another one")
    return tuple(replace(px, dim=px.dim - (d < px.dim)) for _ in range(k))


def _groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dimensions of two shapes with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pi, pj = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= a[i]
                i += 1
            else:
                gj.append(j)
                pj *= b[j]
                j += 1
        groups.append((gi, gj))
    if groups:  # trailing size-1 dims join the last group
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    else:
        groups.append((list(range(len(a))), list(range(len(b)))))
    return groups


def _reshape_split(c: Ctx, n: fx.Node, px: Shard, src: list[int], dst: list[int]) -> Shard:
    """Where does split `px` of a value of shape `src` land when reshaped to `dst`?"""
    for gi, gj in _groups(src, dst):
        if px.dim not in gi:
            continue
        if px.padded is not None:  # a padded dimension may only be carried over whole
            outer = [o for o in gj if dst[o] != 1]
            alone = [d for d in gi if src[d] != 1] == [px.dim]
            if alone and len(outer) == 1 and dst[outer[0]] == src[px.dim]:
                return replace(px, dim=outer[0])
            raise c.refuse(
                n, f"reshape from {src} to {dst} mixes the padded vocabulary dimension "
                f"{px.dim} with other dimensions",
                "keep the vocabulary dimension whole in reshapes (e.g. view(-1, vocab))",
            )  # fmt: skip
        k, ways = gi.index(px.dim), px.slices(c.tp)
        parts = px.parts * math.prod(src[d] for d in gi[:k])  # outer dims become parts
        stuck = None
        for j, o in enumerate(gj):
            size = dst[o]
            if size == 1:  # holds nothing to split (x.view(B, 1, C) for one token)
                continue
            if parts > 1 and parts % size == 0:  # a dimension of whole parts
                parts //= size
                continue
            if size % parts == 0 and (size // parts) % ways == 0:
                _guard(c, n, [(d, src[d]) for d in gi[:k]], [(d, dst[d]) for d in gj[:j]])
                return Shard(o, parts, replicas=px.replicas)
            stuck = size
            break
        if stuck is not None and stuck % ways:
            lands = f"; the split would land on a dimension of size {stuck}"
        elif stuck is not None:  # divisible by tp, but not in whole parts of the split
            lands = f"; its {parts} parts do not tile the dimension of size {stuck}"
        else:
            lands = ""
        raise c.refuse(
            n,
            f"reshape from {src} to {dst} would move elements between ranks: dimension "
            f"{px.dim} (size {src[px.dim]}, split {ways} ways"
            + (f" in each of {px.parts} parts" if px.parts > 1 else "")
            + f") does not map onto a dimension of {dst} divisible by {ways}"
            + lands,
            "that dimension is usually the number of heads (or of key/value heads, for "
            "grouped-query attention): choose tp dividing it, or keep this layer replicated",
        )
    raise AssertionError("unreachable: every dimension is in a group")


def _guard(c: Ctx, n: fx.Node, src: list[tuple[int, int]], dst: list[tuple[int, int]]) -> None:
    """Record the sizes a reshape's split was proven for (the dimensions merged in front
    of the split one, those it skipped in the new shape): a batch of 1 folded with the
    heads is the heads alone, a batch of 2 is not. Every call checks them (rewrite). A
    value split along the sequence has other local sizes: not guarded here."""
    if not (src or dst) or any(c.reads_sequence(a, n) for a in n.all_input_nodes):
        return
    c.guards[n] = (tuple(src), tuple(dst))


def _view(c: Ctx, call: Call) -> Placement:
    n, x, sizes = call.node, call.input, call["shape"]
    px = c.p(x)
    src, dst = list(val(x).shape), list(val(n).shape)
    out = _reshape_split(c, n, px, src, dst) if isinstance(px, Shard) else R
    local = _local_int(out)
    want = [local if isinstance(out, Shard) and out.dim == i else R for i in range(len(dst))]
    if isinstance(sizes, fx.Node):  # a whole shape computed elsewhere, e.g. y.size()
        got = c.p(sizes)
        if isinstance(got, tuple) and list(got) == want:
            return out
        raise c.refuse(
            n, f"the target shape {sizes.name} has placements {got}, the split needs {want}",
            "spell the shape out (B, T, n_head, head_dim) so autotp can rewrite its parts",
        )  # fmt: skip
    for i, a in enumerate(sizes):
        path = call.path("shape", i)
        pa = c.p(a)
        if want[i] == R:
            if isinstance(pa, LocalInt):
                raise c.refuse(
                    n, f"size {i} of the reshape is a local size on a replicated dimension",
                    "compute it from replicated values",
                )  # fmt: skip
            continue
        if isinstance(pa, LocalInt) and pa != local:
            raise c.refuse(
                n, f"size {i} of the reshape is a rank's size of a dimension split otherwise",
                "compute it from replicated values",
            )  # fmt: skip
        if isinstance(pa, LocalInt) or a == -1:
            continue
        # want[i] is R at every i unless `out` is a split (then local at its dim)
        assert isinstance(out, Shard)
        if out.padded is not None:  # the vocabulary is static: the local size is a constant
            c.edits.append(ArgEdit(n, path, a, out.padded // c.tp))
        else:
            _local_size(c, n, path, a, out)
    return out


def _local_int(px: Placement) -> LocalInt:
    """What a rank's size of the split dimension of a value placed `px` is."""
    if not isinstance(px, Shard):
        return LocalInt()
    return LocalInt(padded=px.padded is not None, replicas=px.replicas)


def _local_size(
    c: Ctx, n: fx.Node, path: tuple[int | str, ...], a: int | fx.Node, px: Shard
) -> None:
    """Rewrite size argument `a` (at `path` of `n`), a serial size along the dimension
    split as `px`, to a rank's: a literal divided, a computed one through DivideByTP."""
    if isinstance(a, int):
        c.edits.append(ArgEdit(n, path, a, a // px.slices(c.tp)))
    else:
        c.edits.append(ArgEdit(n, path, a, DivideByTP(a, px.replicas)))


def _flatten(c: Ctx, call: Call) -> Placement:
    px = c.p(call.input)
    if not isinstance(px, Shard):
        return R
    src, dst = list(val(call.input).shape), list(val(call.node).shape)
    return _reshape_split(c, call.node, px, src, dst)


def _split(c: Ctx, call: Call) -> Placement:
    n, px, name, dim = call.node, c.p(call.input), call.op, call["dim"]
    k = len(val(n))
    if not isinstance(px, Shard):
        return tuple(R for _ in range(k))
    if dim != px.dim:
        return tuple(px for _ in range(k))
    pieces = [v.shape[dim] for v in val(n)]
    if px.parts % k != 0 or len(set(pieces)) != 1:
        raise c.refuse(
            n, f"{name} into {pieces} along the split dimension {dim}, whose value is split "
            f"{px.slices(c.tp)} ways"
            + (f" in each of {px.parts} parts" if px.parts > 1 else ""),
            "split a fused projection into as many equal pieces as it has parts",
        )  # fmt: skip
    if name == "split":
        size = call["split_size"]
        path = call.path("split_size")
        if isinstance(size, (list, tuple)):
            for i, s in enumerate(size):
                if not isinstance(c.p(s), LocalInt):
                    _local_size(c, n, (*path, i), s, px)
        elif not isinstance(c.p(size), LocalInt):
            _local_size(c, n, path, size, px)
    return tuple(replace(px, parts=px.parts // k) for _ in range(k))


def _slice(c: Ctx, call: Call) -> Placement:
    """aten.slice(x, dim, start, end, step): fine along a replicated dimension."""
    px, dim = c.p(call.input), call["dim"]
    if not isinstance(px, Shard):
        return R
    if px.sections and dim == px.dim:
        return _section(c, call, px)
    if dim == px.dim and tuple(val(call.node).shape) != tuple(val(call.input).shape):
        raise c.refuse(
            call.node, f"slicing the split dimension {dim}", "slice replicated dimensions"
        )
    return px


def _cat(c: Ctx, call: Call) -> Placement:
    ps = [c.p(t) for t in call["tensors"]]
    if not any(isinstance(p, Shard) for p in ps):
        return R
    dim = call["dim"]
    s = ps[0]  # all alike, one a Shard: all Shards
    if len(set(ps)) != 1 or not isinstance(s, Shard) or s.dim == dim:
        raise c.refuse(
            call.node,
            f"concatenating values split as {[str(p) for p in ps]} along dimension {dim}",
            "concatenate values split alike, along a replicated dimension",
        )  # fmt: skip
    return ps[0]


def _stack(c: Ctx, call: Call) -> Placement:
    """torch.stack of values split alike: a new dimension, before or after the split one
    (the interleaved rotary of GPT-J and Cohere stacks the rotated halves)."""
    ps = [c.p(t) for t in call["tensors"]]
    if not any(isinstance(p, Shard) for p in ps):
        return R
    s = ps[0]  # all alike, one a Shard: all Shards
    if len(set(ps)) != 1 or not isinstance(s, Shard):
        raise c.refuse(
            call.node, f"stacking values split as {[str(p) for p in ps]}",
            "stack values split alike (all from the same split block)",
        )  # fmt: skip
    new = call["dim"]
    return replace(s, dim=s.dim + 1 if new <= s.dim else s.dim)


def _expand(c: Ctx, call: Call) -> Placement:
    """expand(x, sizes) or x.expand(*sizes): the size at the split dimension becomes local."""
    n, x, sizes = call.node, call.input, call["size"]
    px = c.p(x)
    if not isinstance(px, Shard):
        if any(isinstance(c.p(a), LocalInt) for a in sizes if isinstance(a, fx.Node)):
            raise c.refuse(n, "expanding to a local size", "expand with replicated sizes")
        return R
    out = replace(px, dim=px.dim + len(sizes) - ndim(x))
    for i, a in enumerate(sizes):
        pa = c.p(a)
        if i != out.dim:
            if isinstance(pa, LocalInt):
                raise c.refuse(n, f"size {i} is local", "expand with replicated sizes")
            continue
        if isinstance(pa, LocalInt) and pa != _local_int(out):
            raise c.refuse(
                n, f"size {i} of the expand is a rank's size of a dimension split otherwise",
                "expand with replicated sizes",
            )  # fmt: skip
        if isinstance(pa, LocalInt) or a == -1:
            continue
        _local_size(c, n, call.path("size", i), a, out)
    return out


RULES: dict[str, Callable[[Ctx, Call], Placement]] = {
    "identity": _identity,  # contiguous, clone, to(dtype), type_as: same placement
    "size": _size,  # a local size where the tensor is split
    "getattr": _getattr,  # x.shape like size(); dtype/device replicated
    "getitem": _getitem,  # tuple element, or a tensor index that leaves the split whole
    "index": _index,  # aten.index: one integer index off the split dimension
    "view": _view,  # split moves to the outermost dim of its group; its size arg rewritten
    "flatten": _flatten,  # like view, no size arguments
    "transpose": _transpose,  # the split follows its dimension
    "permute": _permute,  # the split follows its dimension
    "unsqueeze": _unsqueeze,  # the split shifts
    "unbind": _unbind,  # one value per index of a replicated dimension
    "squeeze": _squeeze,  # the split shifts past the size-1 dimensions removed before it
    "split": _split,  # along the split dim: one piece per part, split size / tp
    "chunk": _split,  # along the split dim: one piece per part
    "slice": _slice,  # along a replicated dimension only
    "cat": _cat,  # values split alike, along a replicated dimension
    "stack": _stack,  # values split alike: the split shifts past a new dimension before it
    "expand": _expand,  # the size argument at the split dimension becomes local
    **dict.fromkeys(("new_ones", "new_zeros", "new_full", "new_empty"), _new_tensor),  # R
}
