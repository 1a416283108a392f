"""Stage 3, shapes: sharding propagation over every node, and the shape constants it implies.

Each value gets a placement:
  R             the full value, identical on every rank (ints: the serial value)
  S(d)          split along dimension d: rank r holds the r-th of tp equal slices
  S(d x b)      split along d inside each of b equal blocks (a fused Q|K|V output)
  local int     an int whose value on every rank is (serial value) / tp, e.g. a split size

The rule table `_TABLE` has one entry per normalised op (ops.py). An op whose inputs are
all R is replicated compute and always correct, so only ops touched by a split value need
an entry; a split value reaching an op with no entry is refused, naming the node.

Shape constants are rewritten by provenance, never by value: the
view/split entries know which output dimension carries the split and rewrite exactly the
argument for that dimension: a literal is divided, an int computed from replicated sizes
gets a `// tp`, an int computed from local sizes stays, and -1 stays.

Communication falls out of the placements: a value that carries a gradient and enters an
op whose output is split gets one f (its gradient is a partial sum), and a row-split
linear's partial output gets one g (rewrite.py inserts both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from . import ops
from .errors import AutoTPError, node_error
from .match import EmbeddingInfo, LinearInfo
from .rule import Column, Row, Split, Vocab

__all__ = [
    "R", "Replicate", "Shard", "LocalInt", "Placement", "DivideByTP", "ArgEdit",
    "Propagation", "propagate", "VocabOptions", "LossInfo",
]  # fmt: skip


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int
    blocks: int = 1
    padded: int | None = None  # the dimension is padded to this serial size first (vocab)

    def __str__(self) -> str:
        s = f"S({self.dim})" if self.blocks == 1 else f"S({self.dim}x{self.blocks})"
        return s if self.padded is None else f"{s[:-1]}, pad {self.padded})"


@dataclass(frozen=True)
class LocalInt:
    padded: bool = False  # the size of a padded split dimension: padded / tp

    def __str__(self) -> str:
        return "local"


@dataclass(frozen=True)
class VocabOptions:
    """How the vocabulary is split.

    multiple: the vocabulary is padded to a multiple of `multiple * tp` (128 as in
        Megatron-LM: GPT-2's 50,257 becomes 51,200 at tp=8); padded rows never affect
        the loss, the softmax or any gradient.
    gather_outputs: split values the model returns (logits) are gathered, so the parallel
        module returns what the serial one does. False keeps each rank's slice of the
        padded vocabulary, [..., padded_vocab / tp], for users who compute their own
        parallel loss.
    """

    multiple: int = 128
    gather_outputs: bool = True

    def padded(self, size: int, tp: int) -> int:
        if tp == 1:  # nothing is divided: no padding, the module keeps the serial shapes
            return size
        step = self.multiple * tp
        return -(-size // step) * step


@dataclass(frozen=True)
class LossInfo:
    """A cross-entropy over split logits, to become the vocab-parallel cross-entropy."""

    vocab: int
    padded: int
    ignore_index: int
    reduction: str


R = Replicate()
LOCAL = LocalInt()
Placement = Any  # Replicate | Shard | LocalInt, or a tuple of placements for tuple values


@dataclass(frozen=True)
class DivideByTP:
    """Edit marker: replace the argument (an int node) by `arg // tp`."""

    source: fx.Node


@dataclass(frozen=True)
class ArgEdit:
    """Rewrite one shape argument of `node`: at `path` (args index or kwargs key, then
    indices into nested lists), `old` becomes `new` (an int, or DivideByTP)."""

    node: fx.Node
    path: tuple[int | str, ...]
    old: Any
    new: Any


@dataclass
class Propagation:
    """The result of propagation: placements, what to shard, where to communicate."""

    placements: dict[fx.Node, Placement]
    params: dict[str, Shard]  # qualified parameter name -> its split (absent: replicated)
    f_inputs: dict[fx.Node, list[fx.Node]]  # value needing f -> consumers that read it split
    edits: list[ArgEdit]
    splits: dict[fx.Node, tuple[Split, LinearInfo]]
    param_users: dict[str, fx.Node] = field(default_factory=dict)
    losses: dict[fx.Node, LossInfo] = field(default_factory=dict)  # -> vocab-parallel CE
    # split values the model returns: (split, serial size); gathered unless kept local
    gathers: dict[fx.Node, tuple[Shard, int]] = field(default_factory=dict)
    gather_outputs: bool = True


class _Ctx:
    def __init__(self, gm: fx.GraphModule, tp: int, splits, linears, options) -> None:
        self.gm, self.tp, self.splits, self.linears = gm, tp, splits, linears
        self.options: VocabOptions = options
        self.rule_names: dict[fx.Node, str] = {}
        self.losses: dict[fx.Node, LossInfo] = {}
        self.gathers: dict[fx.Node, tuple[Shard, int]] = {}
        self.pl: dict[fx.Node, Placement] = {}
        self.params: dict[str, Shard] = {}
        self.param_users: dict[str, fx.Node] = {}
        self.f_inputs: dict[fx.Node, list[fx.Node]] = {}
        self.edits: list[ArgEdit] = []
        self.grad: dict[fx.Node, bool] = {}
        self.split_uses: set[tuple[str, fx.Node]] = set()  # (param, node using its shard)

    # -- helpers -------------------------------------------------------------------------
    def p(self, a: Any) -> Placement:
        """Placement of an argument: nodes by table, Python literals are R."""
        if isinstance(a, fx.Node):
            return self.pl[a]
        if isinstance(a, (list, tuple)):
            return tuple(self.p(x) for x in a)
        return R

    def refuse(self, node: fx.Node, what: str, hint: str) -> Exception:
        return node_error(node, what, hint, rule=self._rule_of(node))

    def _rule_of(self, node: fx.Node) -> str | None:
        if node in self.splits:
            return f"{self.rule_names.get(node, '?')} ({self.splits[node][0]})"
        return None

    def shard_param(self, node: fx.Node, name: str, spec: Shard) -> None:
        prev = self.params.get(name)
        self.split_uses.add((name, node))
        if name in self.param_users and prev != spec:
            raise node_error(
                node,
                f"parameter {name} would be split two ways ({prev or 'replicated'} at "
                f"{self.param_users[name].name}, {spec} here)",
                "a weight shared between a split layer and another use cannot be split; "
                "untie it, or leave one of the layers unmatched",
            )
        self.params[name] = spec
        self.param_users[name] = node

    def use_param_replicated(self, node: fx.Node, name: str) -> None:
        if name in self.params:
            raise node_error(
                node,
                f"parameter {name} is split ({self.params[name]}) for "
                f"{self.param_users[name].name} but used whole here",
                "a weight shared between a split layer and another use cannot be split; "
                "untie it, or leave one of the layers unmatched",
            )
        self.param_users.setdefault(name, node)

    def needs_f(self, value: Any, consumer: fx.Node) -> None:
        """`value` (replicated) feeds split compute in `consumer`: its gradient is partial."""
        if isinstance(value, fx.Node) and self.grad.get(value, False):
            users = self.f_inputs.setdefault(value, [])
            if consumer not in users:
                users.append(consumer)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _ndim(n: Any) -> int:
    v = _val(n)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _is_split(p: Placement) -> bool:
    if isinstance(p, (Shard, LocalInt)):
        return True
    return isinstance(p, tuple) and any(_is_split(x) for x in p)


def _all_args(n: fx.Node) -> list[tuple[tuple[int | str, ...], Any]]:
    """(path, value) for every argument leaf of n, with paths into lists/tuples."""
    out: list[tuple[tuple[int | str, ...], Any]] = []

    def walk(path: tuple[int | str, ...], a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for i, x in enumerate(a):
                walk((*path, i), x)
        elif isinstance(a, dict):
            for k, x in a.items():
                walk((*path, k), x)
        elif isinstance(a, slice):
            for k in ("start", "stop", "step"):
                walk((*path, k), getattr(a, k))
        else:
            out.append((path, a))

    for i, a in enumerate(n.args):
        walk((i,), a)
    for k, a in n.kwargs.items():
        walk((k,), a)
    return out


def _arg(n: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _arg_path(n: fx.Node, pos: int, name: str) -> tuple[int | str, ...]:
    return (pos,) if len(n.args) > pos else (name,)


def _replicated_like(val: Any) -> Placement:
    if isinstance(val, (list, tuple)):
        return tuple(_replicated_like(v) for v in val)
    return R


# -- the rule table ------------------------------------------------------------------------


def _pointwise(c: _Ctx, n: fx.Node) -> Placement:
    """Elementwise with broadcasting: split operands must agree; replicated ones must
    broadcast along the split dimension (size 1), or be parameters, which are then split."""
    out = _val(n)
    if not isinstance(out, torch.Tensor):
        return _int_arith(c, n)
    nd = out.dim()
    split: Shard | None = None
    for _, a in _all_args(n):
        pa = c.p(a)
        if isinstance(pa, LocalInt):
            raise c.refuse(n, "a local size is used as a value", "compute it from R values")
        if isinstance(pa, Shard):
            s = replace(pa, dim=pa.dim + nd - _ndim(a))
            if split is not None and s != split:
                raise c.refuse(
                    n, f"operands are split differently ({split} and {s})",
                    "both operands must come from the same split block",
                )  # fmt: skip
            split = s
    if split is None:
        return R
    for path, a in _all_args(n):
        if not isinstance(a, fx.Node) or not isinstance(_val(a), torch.Tensor):
            continue
        if c.pl[a] != R:
            continue
        i = split.dim - (nd - _ndim(a))
        shape = tuple(_val(a).shape)
        if i >= 0 and shape[i] != 1:
            if a.op == "get_attr" and str(a.target) in _param_names(c.gm):
                c.shard_param(n, str(a.target), replace(split, dim=i))
                c.pl[a] = replace(split, dim=i)
                continue
            raise c.refuse(
                n,
                f"argument {path} {a.name} of shape {list(shape)} is replicated but spans the "
                f"split dimension {split.dim} of the result in full",
                "only size-1 (broadcast) replicated operands can meet a split value; "
                "compute this operand from the split value instead",
            )
        c.needs_f(a, n)
    return split


def _param_names(gm: fx.GraphModule) -> set[str]:
    names = getattr(gm, "_autotp_param_names", None)
    if names is None:
        names = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
        gm._autotp_param_names = names  # cached on the traced (private) graph module
    return names


def _identity(c: _Ctx, n: fx.Node) -> Placement:
    return c.p(n.args[0])


def _int_arith(c: _Ctx, n: fx.Node) -> Placement:
    name = ops.op_name(n, c.gm)
    a = [c.p(x) for x in n.args]
    if not any(isinstance(x, LocalInt) for x in a):
        return R
    if any(isinstance(x, LocalInt) and x.padded for x in a):
        raise c.refuse(
            n, "arithmetic on the local size of a padded vocabulary",
            "use the vocabulary size from the config, or keep the output layer replicated",
        )  # fmt: skip
    if name in ("add", "sub") and all(isinstance(x, LocalInt) for x in a):
        return LOCAL
    if name == "mul" and sum(isinstance(x, LocalInt) for x in a) == 1:
        return LOCAL
    if name in ("floordiv", "div") and isinstance(a[0], LocalInt) and a[1] == R:
        serial, divisor = _val(n.args[0]), _val(n.args[1])
        if serial % (divisor * c.tp) == 0:
            return LOCAL
    raise c.refuse(
        n, f"cannot tell what '{name}' of a local size is on each rank",
        "compute sizes from replicated values (config fields, sizes of unsplit tensors)",
    )  # fmt: skip


def _size(c: _Ctx, n: fx.Node) -> Placement:
    x = n.args[0]
    nd = _ndim(x)
    dims = _shape_of(c, x)
    d = _arg(n, 1, "dim")
    if d is None:
        return dims
    return dims[_norm_dim(d, nd)]


# Attributes that are the same on a shard as on the whole tensor.
_META_ATTRS = frozenset(
    "dtype device ndim is_cuda is_meta requires_grad layout is_sparse is_quantized".split()
)


def _getattr(c: _Ctx, n: fx.Node) -> Placement:
    """x.shape like size(); metadata attributes are replicated; any other attribute of a
    split value (.T, .mT, .data, .real, ...) has no rule and is refused."""
    attr = n.args[1]
    if attr == "shape":
        return _shape_of(c, n.args[0])
    if attr in _META_ATTRS or not _is_split(c.p(n.args[0])):
        return R
    raise c.refuse(
        n, f"attribute .{attr} of a split value has no sharding rule",
        "use an explicit op autotp knows (x.transpose(-2, -1) for .T / .mT, x.detach() for "
        ".data), or compute this outside the split block",
    )  # fmt: skip


def _shape_of(c: _Ctx, x: fx.Node) -> Placement:
    px = c.p(x)
    local = LocalInt(padded=isinstance(px, Shard) and px.padded is not None)
    return tuple(local if isinstance(px, Shard) and px.dim == i else R for i in range(_ndim(x)))


def _getitem(c: _Ctx, n: fx.Node) -> Placement:
    base, idx = n.args[0], n.args[1]
    pb = c.p(base)
    if isinstance(pb, tuple):  # a tuple of values (split outputs, sizes)
        if isinstance(idx, slice):
            return pb[idx]
        if isinstance(idx, int):
            return pb[idx]
        raise c.refuse(n, "indexing a tuple with a computed index", "use a literal index")
    if not isinstance(_val(base), torch.Tensor):
        return R
    items = idx if isinstance(idx, tuple) else (idx,)
    for it in items:  # slice bounds must be serial values
        parts = (it.start, it.stop, it.step) if isinstance(it, slice) else (it,)
        if any(isinstance(c.p(x), LocalInt) for x in parts if isinstance(x, fx.Node)):
            raise c.refuse(n, "a slice bound is a local size", "slice with replicated sizes")
    if pb == R:
        if any(isinstance(x, fx.Node) and _is_split(c.p(x)) for _, x in _all_args(n)[1:]):
            raise c.refuse(n, "indexing with a split index", "index with replicated values")
        return R
    # A split tensor: ints, slices, None and ... only (a list, bool or tensor index has no
    # rule), and only full slices may touch the split dimension.
    for it in items:
        basic = it is None or it is Ellipsis or isinstance(it, slice)
        basic = basic or (isinstance(it, int) and not isinstance(it, bool))
        basic = basic or (isinstance(it, fx.Node) and isinstance(_val(it), int))
        if not basic:
            raise c.refuse(
                n, f"index {it!r} ({type(_val(it)).__name__}) into a split value",
                "index split values with ints and slices only; gather with a list or "
                "tensor index outside the split block",
            )  # fmt: skip
    nd = _ndim(base)
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
        if isinstance(it, slice):
            out_dim += 1
        in_dim += 1
    return replace(pb, dim=out_dim + pb.dim - in_dim)


def _transpose(c: _Ctx, n: fx.Node) -> Placement:
    px = c.p(n.args[0])
    if not isinstance(px, Shard):
        return R
    nd = _ndim(n.args[0])
    d0 = _norm_dim(_arg(n, 1, "dim0"), nd)
    d1 = _norm_dim(_arg(n, 2, "dim1"), nd)
    d = {d0: d1, d1: d0}.get(px.dim, px.dim)
    return replace(px, dim=d)


def _permute(c: _Ctx, n: fx.Node) -> Placement:
    px = c.p(n.args[0])
    if not isinstance(px, Shard):
        return R
    dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
    if not dims:
        dims = n.kwargs["dims"]
    nd = _ndim(n.args[0])
    return replace(px, dim=[_norm_dim(d, nd) for d in dims].index(px.dim))


def _unsqueeze(c: _Ctx, n: fx.Node) -> Placement:
    px = c.p(n.args[0])
    if not isinstance(px, Shard):
        return R
    d = _norm_dim(_arg(n, 1, "dim"), _ndim(n))
    return replace(px, dim=px.dim + 1 if d <= px.dim else px.dim)


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


def _reshape_split(c: _Ctx, n: fx.Node, px: Shard, src: list[int], dst: list[int]) -> Shard:
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
        k = gi.index(px.dim)
        blocks = px.blocks * math.prod(src[d] for d in gi[:k])  # outer dims become blocks
        stuck = None
        for o in gj:
            size = dst[o]
            if blocks > 1 and blocks % size == 0:  # a dimension of whole blocks
                blocks //= size
                continue
            if size % blocks == 0 and (size // blocks) % c.tp == 0:
                return Shard(o, blocks)
            stuck = size
            break
        if stuck is not None and stuck % c.tp:
            lands = f"; the split would land on a dimension of size {stuck}"
        elif stuck is not None:  # divisible by tp, but not in whole blocks of the split
            lands = f"; its {blocks} blocks do not tile the dimension of size {stuck}"
        else:
            lands = ""
        raise c.refuse(
            n,
            f"reshape from {src} to {dst} would move elements between ranks: dimension "
            f"{px.dim} (size {src[px.dim]}, split {c.tp} ways"
            + (f" in each of {px.blocks} blocks" if px.blocks > 1 else "")
            + f") does not map onto a dimension of {dst} divisible by {c.tp}"
            + lands,
            "that dimension is usually the number of heads (or of key/value heads, for "
            "grouped-query attention): choose tp dividing it, or keep this layer replicated",
        )
    raise AssertionError("unreachable: every dimension is in a group")


def _view(c: _Ctx, n: fx.Node) -> Placement:
    x = n.args[0]
    px = c.p(x)
    src, dst = list(_val(x).shape), list(_val(n).shape)
    # The size arguments: view(x, a, b, ...) or view(x, (a, b, ...)) or a shape node.
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple, fx.Node)):
        sizes, base = n.args[1], (1,)
    elif "shape" in n.kwargs or "size" in n.kwargs:
        key = "shape" if "shape" in n.kwargs else "size"
        sizes, base = n.kwargs[key], (key,)
    else:
        sizes, base = list(n.args[1:]), ()
    out = _reshape_split(c, n, px, src, dst) if isinstance(px, Shard) else R
    local = LocalInt(padded=isinstance(out, Shard) and out.padded is not None)
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
        path = (*base, i) if base else (i + 1,)
        pa = c.p(a)
        if want[i] == R:
            if isinstance(pa, LocalInt):
                raise c.refuse(
                    n, f"size {i} of the reshape is a local size on a replicated dimension",
                    "compute it from replicated values",
                )  # fmt: skip
            continue
        if isinstance(pa, LocalInt) or a == -1:
            continue
        if out.padded is not None:  # the vocabulary is static: the local size is a constant
            c.edits.append(ArgEdit(n, path, a, out.padded // c.tp))
        elif isinstance(a, int):
            c.edits.append(ArgEdit(n, path, a, a // c.tp))
        else:
            c.edits.append(ArgEdit(n, path, a, DivideByTP(a)))
    return out


def _flatten(c: _Ctx, n: fx.Node) -> Placement:
    px = c.p(n.args[0])
    if not isinstance(px, Shard):
        return R
    return _reshape_split(c, n, px, list(_val(n.args[0]).shape), list(_val(n).shape))


def _split(c: _Ctx, n: fx.Node) -> Placement:
    x = n.args[0]
    px = c.p(x)
    nd = _ndim(x)
    name = ops.op_name(n, c.gm)
    k = len(_val(n))
    if not isinstance(px, Shard):
        return tuple(R for _ in range(k))
    dim = _norm_dim(_arg(n, 2, "dim", 0), nd)
    if dim != px.dim:
        return tuple(px for _ in range(k))
    pieces = [v.shape[dim] for v in _val(n)]
    if px.blocks % k != 0 or len(set(pieces)) != 1:
        raise c.refuse(
            n, f"{name} into {pieces} along the split dimension {dim}, whose value is split "
            f"{c.tp} ways" + (f" in each of {px.blocks} blocks" if px.blocks > 1 else ""),
            "split a fused projection into as many equal parts as it has blocks",
        )  # fmt: skip
    if name == "split":
        size = _arg(n, 1, "split_size_or_sections" if n.op == "call_function" else "split_size")
        path = _arg_path(
            n, 1, "split_size_or_sections" if n.op == "call_function" else "split_size"
        )
        if isinstance(size, (list, tuple)):
            for i, s in enumerate(size):
                if isinstance(s, int):
                    c.edits.append(ArgEdit(n, (*path, i), s, s // c.tp))
                elif not isinstance(c.p(s), LocalInt):
                    c.edits.append(ArgEdit(n, (*path, i), s, DivideByTP(s)))
        elif isinstance(size, int):
            c.edits.append(ArgEdit(n, path, size, size // c.tp))
        elif not isinstance(c.p(size), LocalInt):
            c.edits.append(ArgEdit(n, path, size, DivideByTP(size)))
    return tuple(Shard(dim, px.blocks // k) for _ in range(k))


def _slice(c: _Ctx, n: fx.Node) -> Placement:
    """aten.slice(x, dim, start, end, step): fine along a replicated dimension."""
    px = c.p(n.args[0])
    if not isinstance(px, Shard):
        return R
    nd = _ndim(n.args[0])
    dim = _norm_dim(_arg(n, 1, "dim", 0), nd)
    if dim == px.dim and tuple(_val(n).shape) != tuple(_val(n.args[0]).shape):
        raise c.refuse(n, f"slicing the split dimension {dim}", "slice replicated dimensions")
    return px


def _cat(c: _Ctx, n: fx.Node) -> Placement:
    parts = _arg(n, 0, "tensors")
    ps = [c.p(t) for t in parts]
    if not any(isinstance(p, Shard) for p in ps):
        return R
    nd = _ndim(n)
    dim = _norm_dim(_arg(n, 1, "dim", 0), nd)
    if len(set(ps)) != 1 or ps[0].dim == dim:
        raise c.refuse(
            n, f"concatenating values split as {[str(p) for p in ps]} along dimension {dim}",
            "concatenate values split alike, along a replicated dimension",
        )  # fmt: skip
    return ps[0]


def _expand(c: _Ctx, n: fx.Node) -> Placement:
    """expand(x, sizes) or x.expand(*sizes): the size at the split dimension becomes local."""
    x = n.args[0]
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):
        sizes, base = n.args[1], (1,)
    elif "size" in n.kwargs:
        sizes, base = n.kwargs["size"], ("size",)
    else:
        sizes, base = n.args[1:], ()
    px = c.p(x)
    if not isinstance(px, Shard):
        if any(isinstance(c.p(a), LocalInt) for a in sizes if isinstance(a, fx.Node)):
            raise c.refuse(n, "expanding to a local size", "expand with replicated sizes")
        return R
    out = replace(px, dim=px.dim + len(sizes) - _ndim(x))
    for i, a in enumerate(sizes):
        pa = c.p(a)
        if i != out.dim:
            if isinstance(pa, LocalInt):
                raise c.refuse(n, f"size {i} is local", "expand with replicated sizes")
            continue
        if isinstance(pa, LocalInt) or a == -1:
            continue
        path = (*base, i) if base else (i + 1,)
        if isinstance(a, int):
            c.edits.append(ArgEdit(n, path, a, a // c.tp))
        else:
            c.edits.append(ArgEdit(n, path, a, DivideByTP(a)))
    return out


def _mean(c: _Ctx, n: fx.Node) -> Placement:
    x = n.args[0]
    px = c.p(x)
    nd = _ndim(x)
    dims = _arg(n, 1, "dim")
    if not isinstance(px, Shard):
        return _check_replicated_rest(c, n, 1)
    if dims is None or isinstance(dims, int) or len(dims) == 0:
        dims = [dims] if isinstance(dims, int) else list(range(nd))  # () and [] mean all
    dims = {_norm_dim(d, nd) for d in dims}
    if px.dim in dims:
        raise c.refuse(n, f"reduction over the split dimension {px.dim}", "no rule for this")
    keep = _arg(n, 2, "keepdim", False)
    return px if keep else replace(px, dim=px.dim - sum(d < px.dim for d in dims))


def _assert(c: _Ctx, n: fx.Node) -> Placement:
    return R  # aten._assert_tensor_metadata checks dtype/device/layout: true of a shard too


def _reduce_over(c: _Ctx, n: fx.Node, dims: set[int]) -> Placement:
    px = c.p(n.args[0])
    if not isinstance(px, Shard):
        return _check_replicated_rest(c, n, 1)
    if px.dim in dims:
        raise c.refuse(
            n, f"{ops.op_name(n, c.gm)} over the split dimension {px.dim}",
            "this op needs the whole dimension; no propagation rule for a split here",
        )  # fmt: skip
    _check_replicated_rest(c, n, 1, consumer_split=True)
    return px


def _check_replicated_rest(c: _Ctx, n: fx.Node, start: int, consumer_split: bool = False):
    for _, a in _all_args(n)[start:]:
        if isinstance(a, fx.Node) and _is_split(c.p(a)):
            raise c.refuse(n, f"split argument {a.name}", "no rule for a split here")
        if consumer_split and isinstance(a, fx.Node):
            c.needs_f(a, n)
    return R


def _softmax(c: _Ctx, n: fx.Node) -> Placement:
    if n.op == "call_module":
        d = c.gm.get_submodule(str(n.target)).dim
    else:
        d = _arg(n, 1, "dim")
    nd = _ndim(n)
    if d is None:  # torch's implicit choice (deprecated): dim 0 for 0-, 1- and 3-d, else 1
        d = 0 if nd in (0, 1, 3) else 1
    if not isinstance(d, int):
        raise c.refuse(n, "a softmax over a computed dimension", "pass dim as an int")
    return _reduce_over(c, n, {_norm_dim(d, nd)})


def _layer_norm(c: _Ctx, n: fx.Node) -> Placement:
    nd = _ndim(n)
    if n.op == "call_module":
        mod = c.gm.get_submodule(str(n.target))
        k = len(mod.normalized_shape)
        if isinstance(c.p(n.args[0]), Shard) and any(True for _ in mod.parameters()):
            raise c.refuse(
                n, "a layer norm module with weights applied to a split value",
                "normalise replicated values, or use F.layer_norm with explicit weights",
            )  # fmt: skip
    else:
        shape = _arg(n, 1, "normalized_shape")
        k = len(_val(shape)) if isinstance(shape, fx.Node) else len(shape)
    return _reduce_over(c, n, set(range(nd - k, nd)))


def _matmul(c: _Ctx, n: fx.Node) -> Placement:
    if n in c.linears:
        return _linear(c, n)
    a, b = n.args[0], n.args[1]
    pa, pb = c.p(a), c.p(b)
    if not (isinstance(pa, Shard) or isinstance(pb, Shard)):
        return R
    na, nb, no = _ndim(a), _ndim(b), _ndim(n)
    if min(na, nb) < 2:
        raise c.refuse(n, "matmul of a split vector", "no rule for a split here")
    if (isinstance(pa, Shard) and pa.dim == na - 1) or (isinstance(pb, Shard) and pb.dim == nb - 2):
        raise c.refuse(
            n, "matmul over a split contraction dimension would need a partial sum",
            "split the producing linear by columns so heads stay whole, or keep it replicated",
        )  # fmt: skip
    out: Shard | None = None
    for x, px, nx_ in ((a, pa, na), (b, pb, nb)):
        if not isinstance(px, Shard):
            continue
        if px.dim == nx_ - 2 and x is a:
            s = replace(px, dim=no - 2)
        elif px.dim == nx_ - 1 and x is b:
            s = replace(px, dim=no - 1)
        else:
            s = replace(px, dim=px.dim + no - nx_)
        if out is not None and out != s:
            raise c.refuse(n, f"operands split differently ({out}, {s})", "split both by heads")
        out = s
    for x, px, nx_ in ((a, pa, na), (b, pb, nb)):
        if px == R:
            i = out.dim - (no - nx_)
            if out.dim < no - 2 and i >= 0 and _val(x).shape[i] != 1:
                raise c.refuse(
                    n, f"{x.name} is replicated but the other operand is split along a batch "
                    "dimension it spans", "split both operands by heads",
                )  # fmt: skip
            c.needs_f(x, n)
    return out


def _sdpa(c: _Ctx, n: fx.Node) -> Placement:
    q, k, v = (_arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
    ps = [c.p(q), c.p(k), c.p(v)]
    if not any(isinstance(p, Shard) for p in ps):
        return _check_replicated_rest(c, n, 3)
    nd = _ndim(q)
    if len(set(ps)) != 1 or ps[0].dim >= nd - 2:
        raise c.refuse(
            n, f"attention inputs split as {[str(p) for p in ps]}",
            "q, k and v must all be split by heads (a dimension before the last two)",
        )  # fmt: skip
    mask = _arg(n, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        pm = c.p(mask)
        i = ps[0].dim - (nd - _ndim(mask))
        if pm == R and i >= 0 and _val(mask).shape[i] != 1:
            raise c.refuse(n, "a per-head attention mask is replicated", "broadcast the mask")
        if pm not in (R, ps[0]):
            raise c.refuse(n, f"the mask is split as {pm}", "split the mask by heads")
        c.needs_f(mask, n) if pm == R else None
    return ps[0]


def _linear(c: _Ctx, n: fx.Node) -> Placement:
    li = c.linears[n]
    px = c.p(li.input)
    nd = _ndim(n)
    split = c.splits.get(n)
    if split is None:  # an unmatched linear: replicated weights
        if _is_split(px):
            raise c.refuse(
                n, f"linear {li.weight} is not split but its input {li.input.name} is ({px})",
                "no rule matched this layer; its input must be replicated (report the model)",
            )  # fmt: skip
        c.use_param_replicated(n, li.weight)
        if li.bias:
            c.use_param_replicated(n, li.bias)
        return R
    kind = split[0]
    out_dim = 0 if li.layout == "out_in" else 1
    if isinstance(kind, Vocab):
        if px != R:
            raise c.refuse(
                n, f"an output layer split by vocabulary needs a replicated input; "
                f"{li.input.name} is {px}", "report the model",
            )  # fmt: skip
        padded = _padding(c, li.out_features)
        c.shard_param(n, li.weight, Shard(out_dim, 1, padded))
        if li.bias:
            c.shard_param(n, li.bias, Shard(0, 1, padded))
        c.needs_f(li.input, n)
        return Shard(nd - 1, 1, padded)
    if isinstance(kind, Column):
        if px != R:
            raise c.refuse(
                n, f"a column-split linear needs a replicated input; {li.input.name} is {px}",
                "this rule's split conflicts with the one producing the input",
            )  # fmt: skip
        if li.out_features % (kind.blocks * c.tp):
            raise c.refuse(
                n,
                f"{li.weight} has {li.out_features} output features"
                + (f" in {kind.blocks} blocks" if kind.blocks > 1 else "")
                + f", not divisible by tp={c.tp}",
                "choose tp dividing the layer's width (and its number of heads)",
            )
        c.shard_param(n, li.weight, Shard(out_dim, kind.blocks))
        if li.bias:
            c.shard_param(n, li.bias, Shard(0, kind.blocks))
        c.needs_f(li.input, n)
        return Shard(nd - 1, kind.blocks)
    assert isinstance(kind, Row)
    if px != Shard(nd - 1, 1):
        raise c.refuse(
            n, f"a row-split linear needs its input split along the features (S({nd - 1})); "
            f"{li.input.name} is {px}",
            "the value reaching this layer was reshaped in a way that mixes shards",
        )  # fmt: skip
    if li.in_features % c.tp:
        raise c.refuse(n, f"{li.in_features} input features, not divisible by tp={c.tp}",
                       "choose tp dividing the layer's width")  # fmt: skip
    c.shard_param(n, li.weight, Shard(1 - out_dim, 1))
    if li.bias:
        c.use_param_replicated(n, li.bias)
    return R


def _padding(c: _Ctx, vocab: int) -> int | None:
    padded = c.options.padded(vocab, c.tp)
    return None if padded == vocab else padded


def _embedding(c: _Ctx, n: fx.Node) -> Placement:
    split = c.splits.get(n)
    info: EmbeddingInfo | None = split[1] if split else None  # type: ignore[assignment]
    aten = isinstance(n.target, torch._ops.OpOverload)
    ids = n.args[1] if aten else n.args[0]
    if _is_split(c.p(ids)):
        raise c.refuse(n, "embedding lookup with split ids", "look up replicated ids")
    if info is None:
        if n.op == "call_function":
            weight = n.args[0] if aten else _arg(n, 1, "weight")
            if isinstance(weight, fx.Node) and _is_split(c.p(weight)):
                raise c.refuse(n, "lookup in a split table", "report the model")
        return R
    # padding_idx only stops that row's gradient; vocab_embedding keeps that (rewrite.py)
    if n.op == "call_module":
        mod = c.gm.get_submodule(str(n.target))
        extras = {"max_norm": mod.max_norm, "scale_grad_by_freq": mod.scale_grad_by_freq or None,
                  "sparse": mod.sparse or None}  # fmt: skip
    elif aten:  # aten.embedding(weight, ids, padding_idx=-1, scale_grad_by_freq, sparse)
        extras = {"scale_grad_by_freq": _arg(n, 3, "scale_grad_by_freq", False) or None,
                  "sparse": _arg(n, 4, "sparse", False) or None}  # fmt: skip
    else:
        extras = {"max_norm": _arg(n, 3, "max_norm"),
                  "scale_grad_by_freq": _arg(n, 5, "scale_grad_by_freq", False) or None,
                  "sparse": _arg(n, 6, "sparse", False) or None}  # fmt: skip
    if any(v is not None for v in extras.values()):
        raise c.refuse(
            n, f"a vocabulary-split embedding with {extras}",
            "max_norm, scale_grad_by_freq and sparse are not supported on a split "
            "embedding; drop them or keep the embedding replicated",
        )  # fmt: skip
    c.shard_param(n, info.weight, Shard(0, 1, _padding(c, info.num_embeddings)))
    return R  # partial lookups, completed by g (rewrite.py)


def _cross_entropy(c: _Ctx, n: fx.Node) -> Placement:
    logits = n.args[0] if n.args else n.kwargs["input"]
    target = n.args[1] if len(n.args) > 1 else n.kwargs["target"]
    px = c.p(logits)
    if not isinstance(px, Shard):
        return _check_replicated_rest(c, n, 1)
    if c.tp == 1:  # one rank holds the whole vocabulary: keep the serial loss, bit for bit
        return R
    if n.op == "call_module":
        mod = c.gm.get_submodule(str(n.target))
        opts = {"weight": mod.weight, "ignore_index": mod.ignore_index,
                "reduction": mod.reduction, "label_smoothing": mod.label_smoothing}  # fmt: skip
    elif isinstance(n.target, torch._ops.OpOverload):  # aten: reduction is an enum
        reduction = _arg(n, 3, "reduction", 1)
        opts = {"weight": _arg(n, 2, "weight"), "ignore_index": _arg(n, 4, "ignore_index", -100),
                "reduction": {0: "none", 1: "mean", 2: "sum"}.get(reduction, reduction),
                "label_smoothing": _arg(n, 5, "label_smoothing", 0.0)}  # fmt: skip
    else:
        opts = {"weight": _arg(n, 2, "weight"), "ignore_index": _arg(n, 4, "ignore_index", -100),
                "reduction": _arg(n, 6, "reduction", "mean"),
                "label_smoothing": _arg(n, 7, "label_smoothing", 0.0)}  # fmt: skip
    nd = _ndim(logits)
    ok = (
        nd == 2 and px.dim == 1 and px.blocks == 1 and _ndim(target) == 1
        and opts["weight"] is None and not opts["label_smoothing"]
        and opts["reduction"] in ("mean", "sum", "none") and c.p(target) == R
    )  # fmt: skip
    if not ok:
        raise c.refuse(
            n, f"cross-entropy over logits split as {px} with {opts}",
            "the vocab-parallel cross-entropy takes [N, vocab] logits and [N] targets, "
            "mean/sum/none reduction, ignore_index, no class weights or label smoothing",
        )  # fmt: skip
    vocab = _val(logits).shape[1]
    padded = px.padded if px.padded is not None else vocab
    c.losses[n] = LossInfo(vocab, padded, opts["ignore_index"], opts["reduction"])
    return R


def _output(c: _Ctx, n: fx.Node) -> Placement:
    for _, a in _all_args(n):
        if not isinstance(a, fx.Node) or not _is_split(c.p(a)):
            continue
        pa = c.p(a)
        if not isinstance(pa, Shard) or pa.blocks != 1:
            raise c.refuse(
                n, f"the model returns {a.name}, split as {pa}",
                "only values split along one dimension can be gathered for the output",
            )  # fmt: skip
        c.gathers[a] = (pa, _val(a).shape[pa.dim])
    return R


_TABLE: dict[str, Callable[[_Ctx, fx.Node], Placement]] = {
    **{name: _pointwise for name in ops.POINTWISE},  # broadcasting elementwise
    "floordiv": _int_arith,  # ints only
    "identity": _identity,  # contiguous, clone, to(dtype), type_as: same placement
    "size": _size,  # a local size where the tensor is split
    "getattr": _getattr,  # x.shape like size(); dtype/device replicated
    "getitem": _getitem,  # tuple element, or a tensor index that leaves the split whole
    "view": _view,  # split moves to the outermost dim of its group; its size arg rewritten
    "flatten": _flatten,  # like view, no size arguments
    "transpose": _transpose,  # the split follows its dimension
    "permute": _permute,  # the split follows its dimension
    "unsqueeze": _unsqueeze,  # the split shifts
    "split": _split,  # along the split dim: one part per block, split size / tp
    "chunk": _split,  # along the split dim: one part per block
    "softmax": _softmax,  # fine unless over the split dim
    "log_softmax": _softmax,  # fine unless over the split dim
    "layer_norm": _layer_norm,  # fine unless over the split dim
    "matmul": _matmul,  # batch dims split alike (heads); never over the contraction dim
    "sdpa": _sdpa,  # q, k, v split by heads alike
    "linear": _linear,  # column: R -> S(-1); row: S(-1) -> R (+ g); vocab: R -> S(-1, pad)
    "embedding": _embedding,  # vocab-split table: partial rows (+ g); others replicated
    "cross_entropy": _cross_entropy,  # over vocab-split logits: the vocab-parallel loss
    "slice": _slice,  # along a replicated dimension only
    "cat": _cat,  # values split alike, along a replicated dimension
    "expand": _expand,  # the size argument at the split dimension becomes local
    "mean": _mean,  # over replicated dimensions only
    "sum": _mean,  # over replicated dimensions only
    "assert": _assert,  # metadata checks hold for shards
    "addmm": _linear,  # Conv1D spelling of a linear
    "output": _output,  # everything returned must be replicated
}


def propagate(
    gm: fx.GraphModule,
    tp: int,
    linears: dict[fx.Node, LinearInfo],
    splits: dict[fx.Node, tuple[Split, LinearInfo | EmbeddingInfo]],
    options: VocabOptions | None = None,
    rule_names: dict[fx.Node, str] | None = None,
) -> Propagation:
    """Placements for every node of `gm` given the layer splits; refuses what it cannot
    prove. Pure: `gm` is not modified. `rule_names` names the rule behind each split
    layer, for error messages."""
    c = _Ctx(gm, tp, splits, linears, options or VocabOptions())
    c.rule_names = rule_names or {}
    for n in gm.graph.nodes:
        val = _val(n)
        c.grad[n] = _carries_grad(gm, n, c.grad)
        if n.op == "placeholder":
            c.pl[n] = _replicated_like(val)
            continue
        if n.op == "get_attr":
            c.pl[n] = R
            continue
        name = "linear" if n in linears else ops.op_name(n, gm)
        if name in ("linear", "addmm") and n not in linears:
            name = "computed linear"  # a weight that is not a parameter: no rule, as any op
        args_split = any(_is_split(c.p(a)) for _, a in _all_args(n))
        rule = _TABLE.get(name)
        if (
            n in linears
            or n in splits
            or (rule is not None and (args_split or name in ("view", "split")))
        ):
            c.pl[n] = _apply_rule(c, n, name, rule) if rule else R
        elif not args_split:
            c.pl[n] = _replicated_like(val)  # replicated compute is always correct
        else:
            raise node_error(
                n,
                f"a split value reaches '{name}', which has no sharding propagation rule",
                "keep this op outside split blocks (before the column-split linear or after "
                "the row-split one), or file an issue to add a rule for it",
            )
    _check_split_params_used_only_split(c)
    return Propagation(
        c.pl, c.params, c.f_inputs, c.edits, splits, c.param_users, c.losses, c.gathers,
        c.options.gather_outputs,
    )  # fmt: skip


def _apply_rule(c: _Ctx, n: fx.Node, name: str, rule: Callable) -> Placement:
    """A table entry's placement for `n`. An entry that cannot read this spelling of the
    call (an argument form it does not know) refuses the node rather than crash."""
    try:
        return rule(c, n)
    except AutoTPError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown means refuse
        raise node_error(
            n,
            f"autotp's rule for '{name}' cannot read this call ({type(e).__name__}: {e})",
            "spell the call the usual way (positional arguments as in the PyTorch docs), "
            "or keep it outside split blocks; please report the model",
        ) from e


def _check_split_params_used_only_split(c: _Ctx) -> None:
    """A split parameter must reach nothing but the ops that use its shard: any other use,
    under any of its names (tied weights), would read a shard as if it were whole."""
    aliases: dict[int, list[str]] = {}
    for name, p in c.gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
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


def _conflict(c: _Ctx, user: fx.Node, name: str) -> Exception:
    return node_error(
        user,
        f"parameter {name} is split ({c.params[name]}) for {c.param_users[name].name} but "
        "this node uses it whole",
        "a weight shared between a split layer and another use (e.g. tied embeddings) "
        "cannot be split; untie it, or leave one of the layers unmatched",
    )


def _carries_grad(gm: fx.GraphModule, n: fx.Node, grad: dict[fx.Node, bool]) -> bool:
    """Could `n` carry a gradient? Parameters and floating-point inputs do, and what
    depends on them."""
    v = _val(n)
    if n.op == "get_attr":
        return str(n.target) in _param_names(gm)
    if n.op == "placeholder":
        return isinstance(v, torch.Tensor) and v.is_floating_point()
    if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.is_complex()):
        return False
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if any(p.requires_grad for p in mod.parameters()):
            return True
    return any(grad.get(a, False) for a in n.all_input_nodes)
