"""The propagation context and the argument helpers every table entry uses."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..call import Call
from ..errors import node_error
from .placement import (
    ArgEdit,
    Cut,
    LossInfo,
    Partial,
    Placement,
    R,
    Shard,
    VocabOptions,
    is_split,
)


class Ctx:
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
        self.reduces: dict[fx.Node, list[fx.Node]] = {}  # partial value -> readers of its sum
        self.cuts: list[Cut] = []
        self.deferred: dict[fx.Node, fx.Node] = {}  # `p + r` kept partial -> p
        self.current: fx.Node | None = None  # the node whose entry is running
        self.region: dict[fx.Node, int] = {}  # grad-mode region (fx's set_grad boundaries)

    # -- helpers -------------------------------------------------------------------------
    def p(self, a: Any) -> Placement:
        """Placement of an argument: nodes by table, Python literals are R."""
        if isinstance(a, fx.Node):
            p = self.pl[a]
            if isinstance(p, Partial) and self.current in self.reduces.get(a, ()):
                return R  # this node reads the sum
            return p
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

    def reduce(self, value: fx.Node, consumer: fx.Node) -> None:
        """`consumer` reads the sum of the partial `value`: one g, shared by its readers."""
        _add_reader(self.reduces, value, consumer)

    def cut(self, value: fx.Node, consumer: fx.Node, shard: Shard) -> None:
        """`consumer` reads this rank's slice of the replicated `value` (no communication);
        its gradient is then partial, so the value also gets f."""
        if Cut(value, consumer, shard) not in self.cuts:  # an operand read twice: one cut
            self.cuts.append(Cut(value, consumer, shard))
        self.needs_f(value, consumer)

    def needs_f(self, value: Any, consumer: fx.Node) -> None:
        """`value` (replicated) feeds split compute in `consumer`: its gradient is partial."""
        if isinstance(value, fx.Node) and self.grad.get(value, False):
            _add_reader(self.f_inputs, value, consumer)


def _add_reader(table: dict[fx.Node, list[fx.Node]], value: fx.Node, reader: fx.Node) -> None:
    readers = table.setdefault(value, [])
    if reader not in readers:
        readers.append(reader)


def val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def ndim(n: Any) -> int:
    v = val(n)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def replicated_like(val: Any) -> Placement:
    if isinstance(val, (list, tuple)):
        return tuple(replicated_like(v) for v in val)
    return R


def param_names(gm: fx.GraphModule) -> set[str]:
    names = getattr(gm, "_autotp_param_names", None)
    if names is None:
        names = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
        gm._autotp_param_names = names  # cached on the traced (private) graph module
    return names


def check_replicated(c: Ctx, call: Call, *split_ok: str, consumer_split: bool = False):
    """Every argument but `split_ok` must be replicated; with `consumer_split`, those
    feeding this split compute get f."""
    for a in call.others(*split_ok):
        if isinstance(a, fx.Node) and is_split(c.p(a)):
            raise c.refuse(call.node, f"split argument {a.name}", "no rule for a split here")
        if consumer_split and isinstance(a, fx.Node):
            c.needs_f(a, call.node)
    return R


def slice_span(c: Ctx, call: Call, dim: int, size: int) -> tuple[int, int] | None:
    """(start, stop) when `call` takes a contiguous slice of dimension `dim` (of serial
    `size`) of its input and leaves the other dimensions whole: `x[..., a:b]`,
    `x[:, :, a:b]`, aten.slice; None otherwise."""
    x = call.input
    nd = ndim(x)
    if call.op == "slice":
        if call["dim"] != dim or call["step"] != 1:
            return None
        bounds = (call["start"], call["end"])
    elif call.op == "getitem" and isinstance(val(x), torch.Tensor):
        idx = call["index"]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at : at + 1] = [slice(None)] * (nd - len(items) + 1)
        items += [slice(None)] * (nd - len(items))
        if len(items) != nd or not all(isinstance(it, slice) for it in items):
            return None
        if any(it != slice(None) for i, it in enumerate(items) if i != dim):
            return None
        if items[dim].step not in (None, 1):
            return None
        bounds = (items[dim].start, items[dim].stop)
    else:
        return None
    if not all(b is None or (isinstance(b, int) and b >= 0) for b in bounds):
        return None  # a computed or negative bound
    start = bounds[0] or 0
    stop = size if bounds[1] is None else min(bounds[1], size)
    return (start, stop) if start < stop else None
