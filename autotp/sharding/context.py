"""The propagation context and the argument helpers every table entry uses."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from ..common.errors import node_error
from ..match import ops
from ..match.call import Call
from ..match.patterns import EmbeddingInfo, LinearInfo
from ..match.rule import Split
from .placement import (
    ArgEdit,
    Cut,
    LocalInt,
    LossInfo,
    MultiplyByTP,
    Partial,
    Placement,
    R,
    Shard,
    SizeFacts,
    VocabOptions,
    is_split,
)


class Ctx:
    def __init__(
        self,
        gm: fx.GraphModule,
        tp: int,
        splits: dict[fx.Node, tuple[Split, LinearInfo | EmbeddingInfo]],
        linears: dict[fx.Node, LinearInfo],
        options: VocabOptions,
    ) -> None:
        self.gm, self.tp, self.splits, self.linears = gm, tp, splits, linears
        self.options = options
        self.rule_names: dict[fx.Node, str] = {}
        self.losses: dict[fx.Node, LossInfo] = {}
        self.gathers: dict[fx.Node, tuple[Shard, int | None]] = {}
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
        self.means: dict[fx.Node, int] = {}  # means, sums over a split dim (Propagation.means)
        self.current: fx.Node | None = None  # the node whose entry is running
        self.region: dict[fx.Node, int] = {}  # grad-mode region (fx's set_grad boundaries)
        # sequence parallelism (Korthikanti et al. 2022): partial values are summed into a
        # sequence split (reduce-scatter) and read whole (all-gather) only where no entry
        # proves the split can stay
        self.sequence = False
        self.scatters: dict[fx.Node, Shard | None] = {}  # partial -> what its readers see
        self.seq: set[fx.Node] = set()  # values split only because of a sequence split
        self.reads: dict[tuple[fx.Node, fx.Node], Placement] = {}  # (value, reader) -> seen
        self.sequence_gathers: dict[fx.Node, list[fx.Node]] = {}
        self.functional_norms: set[fx.Node] = set()
        self.handed: list[int] = []  # output leaves handed over split along the sequence
        self.whole_readers: set[fx.Node] = set()  # read the sums of partial values whole
        self.guards: dict[fx.Node, SizeFacts] = {}  # reshape -> sizes its proof read

    # -- helpers -------------------------------------------------------------------------
    def p(self, a: Any) -> Placement:
        """Placement of an argument: nodes by table, Python literals are R."""
        if isinstance(a, fx.Node):
            return self.seen(a, self.current)
        if isinstance(a, (list, tuple)):
            return tuple(self.p(x) for x in a)
        return R

    def seen(self, a: fx.Node, reader: fx.Node | None) -> Placement:
        """The placement `reader` reads `a` in: the sum of a partial value it reduces
        (whole, or its sequence split), a sequence-split value it gathers (whole)."""
        seen = self.reads.get((a, reader)) if reader is not None else None
        if seen is not None:
            return seen
        p = self.pl[a]
        if isinstance(p, Partial) and reader in self.reduces.get(a, ()):
            return self.scatters.get(a) or R  # this node reads the sum
        return p

    def reads_sequence(self, a: fx.Node, reader: fx.Node) -> bool:
        """Does `reader` read `a` split along the sequence (and by nothing else)?"""
        if (a, reader) in self.reads:
            return False
        if isinstance(self.pl[a], Partial):
            return reader in self.reduces.get(a, ()) and self.scatters.get(a) is not None
        return a in self.seq

    def snapshot(self) -> dict[str, Any]:
        """The state a table entry may change, to undo an entry that refused."""
        return _copy_state({k: getattr(self, k) for k in _STATE})

    def restore(self, snapshot: dict[str, Any]) -> None:
        for k, v in _copy_state(snapshot).items():
            setattr(self, k, v)

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
        """`consumer` reads the sum of the partial `value`: one g, shared by its readers
        (with sequence parallelism, one reduce-scatter where the value has a sequence)."""
        _add_reader(self.reduces, value, consumer)
        if self.sequence and value not in self.scatters:
            self.scatters[value] = self._sequence_split(value)
        if consumer in self.whole_readers and self.scatters.get(value) is not None:
            self.reads[(value, consumer)] = R  # the sum's sequence, gathered
            _add_reader(self.sequence_gathers, value, consumer)

    def _sequence_split(self, value: fx.Node) -> Shard | None:
        """The split a partial value's sum takes with sequence parallelism: along the
        dimension before the features (the sequence of [batch, seq, hidden], the tokens
        of [tokens, hidden]); None (all-reduced) for a value with no such dimension, or
        one whose size is known not to divide by tp."""
        v = val(value)
        if not isinstance(v, torch.Tensor) or v.dim() < 2:
            return None
        if any(getattr(li, "feature_dim", -1) != -1 for _, li in self.splits.values()):
            return None  # a channels-first layer (conv): the features are not last
        size = v.shape[-2]
        if isinstance(size, int) and (size % self.tp or size == 1):
            return None
        return Shard(v.dim() - 2)

    def gather_sequence(self, node: fx.Node, sizes_only: bool = False) -> bool:
        """`node` cannot take its sequence-split inputs: it reads them whole (all-gather;
        a local sequence length it reads becomes the serial one, x tp). `sizes_only`: the
        lengths only. False when it reads none (the refusal was not about them)."""
        found = False
        for a in node.all_input_nodes:
            p = self.pl[a]
            if isinstance(p, Partial) and not sizes_only:  # its sum, if the node reads it
                if self.scatters.get(a, self._sequence_split(a)) is not None:
                    self.whole_readers.add(node)
                    found = True
                continue
            seen = self.seen(a, node)
            if not self.reads_sequence(a, node) or not is_split(seen):
                continue
            if sizes_only and not isinstance(seen, LocalInt):
                continue
            found = True
            if isinstance(seen, Shard) and _changed_in_place(a):
                return False  # a gathered copy would take the change, not `a`
            if isinstance(seen, Shard):
                _add_reader(self.sequence_gathers, a, node)
            elif isinstance(seen, LocalInt):
                paths = _paths(node, a)
                if not paths:
                    return False  # read somewhere the rewrite cannot reach
                for path in paths:
                    self.edits.append(ArgEdit(node, path, a, MultiplyByTP(a)))
            else:  # a tuple of sizes: no rule reads it whole
                return False
            self.reads[(a, node)] = R
        return found

    def cut(self, value: fx.Node, consumer: fx.Node, shard: Shard) -> None:
        """`consumer` reads this rank's slice of the replicated `value` (no communication);
        its gradient is then partial, so the value also gets f."""
        if Cut(value, consumer, shard) not in self.cuts:  # an operand read twice: one cut
            self.cuts.append(Cut(value, consumer, shard))
        self.needs_f(value, consumer)

    def cut_within(self, value: fx.Node, consumer: fx.Node, have: Shard, want: Shard) -> bool:
        """`consumer` reads `value` (split as `have`) split as `want`: the same split, with
        fewer ranks per slice, is a cut of the slice a rank holds (no communication; the
        gradient stays a rank's share, which the ranks holding the slice sum at the
        weights). False where `want` is no such split."""
        if have == want:
            return True
        if replace(have, replicas=want.replicas) != want or have.replicas % want.replicas:
            return False
        if Cut(value, consumer, want, have.replicas) not in self.cuts:
            self.cuts.append(Cut(value, consumer, want, have.replicas))
        return True

    def needs_f(self, value: Any, consumer: fx.Node) -> None:
        """`value` (replicated) feeds split compute in `consumer`: its gradient is partial."""
        if isinstance(value, fx.Node) and self.grad.get(value, False):
            _add_reader(self.f_inputs, value, consumer)


_STATE = (
    "f_inputs", "reduces", "sequence_gathers", "losses", "gathers", "pl", "params",
    "param_users", "deferred", "scatters", "reads", "edits", "cuts", "split_uses",
    "functional_norms", "whole_readers", "guards", "handed", "means",
)  # fmt: skip


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of each container, and of the reader lists inside the dicts."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = {a: list(b) if isinstance(b, list) else b for a, b in v.items()}
        else:
            out[k] = type(v)(v)
    return out


def _changed_in_place(a: fx.Node) -> bool:
    """Is `a`, or any value sharing its memory (its base, the base's other views), changed
    in place anywhere in the graph?"""
    root = a
    while ops.aliases(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    seen, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if ops.mutates(u):
                return True
            if ops.aliases(u):
                todo.append(u)
    return False


def _paths(node: fx.Node, a: fx.Node) -> list[tuple[int | str, ...]]:
    """Where `a` sits in `node`'s arguments (args index or kwargs key, then indices)."""
    found: list[tuple[int | str, ...]] = []

    def walk(x: Any, path: tuple[int | str, ...]) -> None:
        if x is a:
            found.append(path)
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                walk(y, (*path, i))
        elif isinstance(x, slice):  # x[:T]: the rewrite edits a slice's bounds in place
            for k in ("start", "stop", "step"):
                walk(getattr(x, k), (*path, k))
        elif isinstance(x, dict):
            for k, y in x.items():
                walk(y, (*path, k))

    for i, x in enumerate(node.args):
        walk(x, (i,))
    for k, x in node.kwargs.items():
        walk(x, (k,))
    return found


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
    names: set[str] | None = getattr(gm, "_autotp_param_names", None)
    if names is None:
        names = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
        # cached on the traced (private) graph module; nn.Module.__setattr__ is typed for
        # tensors and modules only, though any value is kept as a plain attribute
        gm._autotp_param_names = names  # type: ignore[assignment]
    return names


def check_replicated(c: Ctx, call: Call, *split_ok: str, consumer_split: bool = False) -> Placement:
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
