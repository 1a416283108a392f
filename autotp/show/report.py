"""The numbers and facts the views show, computed from a Plan alone (no process group, no
weights read): where each parameter goes, what each rank holds, what crosses the wire per
step, which layers stayed whole and why, and the plan as JSON.

Communication is read from the per-rank graph: each collective node's value, at the shape
the plan was traced with (so plan with the batch and sequence you want to size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from ..common.errors import module_path
from ..match import ops
from ..match.rule import Column, Row, Vocab
from ..rewrite.sites import record
from ..runtime.collective_kinds import RUNS, Direction, Op
from ..sharding import Shard
from .shown import ShownPlan, ShownRegionPlan

__all__ = [
    "ParamRow", "CommRow", "params", "communication", "unmatched_reasons", "layer_nodes",
    "to_json", "KIND_STYLE",
]  # fmt: skip

# How a parameter is held: split by columns (output features), by rows, along the
# vocabulary, or whole on every rank
ParamKind = Literal["column", "row", "vocab", "replicated"]

# The colour of each placement, everywhere a placement is drawn.
KIND_STYLE = {
    "column": "green",
    "row": "magenta",
    "vocab": "cyan",
    "replicated": "grey50",
    "collective": "bold yellow",
    "edit": "bold cyan",
}


@dataclass(frozen=True)
class ParamRow:
    name: str
    kind: ParamKind
    rule: str | None
    serial_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    tied_to: str | None = None  # another name of the same tensor, shown but not counted

    @property
    def serial_bytes(self) -> int:
        return _numel(self.serial_shape) * _itemsize(self.dtype)

    @property
    def local_bytes(self) -> int:
        return _numel(self.local_shape) * _itemsize(self.dtype)


@dataclass(frozen=True)
class CommRow:
    node: str
    kind: Op
    direction: Direction
    module: str
    rule: str
    elements: int  # per rank, sent into the collective
    dtype: torch.dtype

    @property
    def bytes(self) -> int:
        return self.elements * _itemsize(self.dtype)

    def ring_bytes(self, tp: int) -> float:
        """What one rank sends over the wire in a ring implementation: an all-reduce is a
        reduce-scatter then an all-gather, each moving (tp - 1) / tp of the value, so
        sequence parallelism's pair moves what one all-reduce does."""
        if self.kind in ("all_reduce", "all_reduce_max"):
            return 2 * (tp - 1) / tp * self.bytes
        if self.kind == "reduce_scatter":
            return (tp - 1) / tp * self.bytes
        return (tp - 1) * self.bytes  # an all-gather: the others' parts, of the rank's size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _kind_of(spec: Shard | None, split: object) -> ParamKind:
    if spec is None:
        return "replicated"
    if isinstance(split, Vocab) or spec.padded is not None:
        return "vocab"
    if isinstance(split, Row):
        return "row"
    return "column"


def params(plan: ShownPlan) -> list[ParamRow]:
    """Every parameter in model order; a tied tensor's other names follow as rows with
    `tied_to` set (bytes counted once)."""
    gm = plan.traced.gm
    splits = plan.splits
    how: dict[str, tuple[object, str]] = {}
    for m in plan.matches:
        for key, layer in m.layers.items():
            for name in (layer.weight, getattr(layer, "bias", None)):
                if name:
                    how[name] = (m.rule.split[key], m.rule.name)
    rows = []
    first: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        tied = first.setdefault(id(p), name)
        spec = splits.get(name)
        split, rule = how.get(name, (Column(), None))
        if spec is not None and rule is None:  # split by propagation (e.g. a bias add)
            rule = _rule_of_param(plan, name)
        local = list(p.shape)
        if spec is not None:
            local[spec.dim] = spec.local_size(spec.padded or local[spec.dim], plan.tp)
        rows.append(ParamRow(name, _kind_of(spec, split), rule, tuple(p.shape), tuple(local),
                             p.dtype, None if tied == name else tied))  # fmt: skip
    return rows


def _rule_of_param(plan: ShownPlan, name: str) -> str | None:
    user = plan.propagation.param_users.get(name)
    return record(user).rule if user is not None else None


def communication(plan: ShownPlan) -> list[CommRow]:
    """The collectives one training step runs on each rank, in graph order."""
    rows = []
    for n in plan.graph.nodes:
        info = record(n)
        what = info.collective
        if not what:
            continue
        vals = list(n.meta["val"]) if isinstance(n.meta.get("val"), tuple) else [n.meta.get("val")]
        if what == "f" and len(vals) == 1:  # of its input
            vals = [n.args[0].meta.get("val")]
        tensors = [v for v in vals if isinstance(v, torch.Tensor)]
        numel = sum(v.numel() for v in tensors)
        dtype = tensors[0].dtype if tensors else torch.float32
        for kind, direction, part in ((r.op, r.direction, r.part) for r in RUNS[what]):
            # an all-gather sends the rank's part; a reduce-scatter its whole summand
            elements = numel // plan.tp if part else numel
            rows.append(CommRow(n.name, kind, direction, module_path(n), info.rule or "",
                                elements, dtype))  # fmt: skip
    return rows


def unmatched_reasons(plan: ShownPlan) -> list[tuple[str, str]]:
    """(weight, why) for each linear layer left whole."""
    gm = plan.traced.gm
    proven_not = {
        li.node: (m.rule.name, why)
        for m, why in getattr(plan, "replicated", ())
        for li in m.layers.values()
    }
    out = []
    for li in plan.unmatched:
        if li.node in proven_not:
            rule, why = proven_not[li.node]
            out.append((li.weight, f"{rule} matched, but its split could not be proven "
                                   f"(left replicated): {why}"))  # fmt: skip
            continue
        feeds = sorted({_describe(u, gm) for u in li.node.users})
        reads = _describe(li.input, gm)
        out.append((li.weight, f"no rule matched: reads {reads}, feeds {', '.join(feeds)}"))
    return out


def _describe(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op in ("placeholder", "output"):
        return "the model's " + ("input" if n.op == "placeholder" else "output")
    name = ops.op_name(n, gm) if n.op.startswith("call") else n.op
    return f"{name} ({module_path(n)})"


_INDEX = re.compile(r"\.(\d+)(\.|$)")


def layer_nodes(graph: fx.Graph, k: int) -> list[fx.Node]:
    """The nodes of transformer layer `k`: those whose module path has `.k.` as its first
    numbered segment (h.k, layer.k, layers.k)."""
    out = []
    for n in graph.nodes:
        m = _INDEX.search(module_path(n))
        if m and int(m.group(1)) == k:
            out.append(n)
    return out


def to_json(plan: ShownPlan) -> dict[str, Any]:
    """The plan as plain data, for scripts."""
    edits = []
    for n in plan.graph.nodes:
        for e in record(n).edits:
            edits.append({"node": n.name, "module": module_path(n), "edit": e})
    return {
        "model": plan.model_name,
        "tp": plan.tp,
        "frontend": plan.traced.frontend,
        "matches": [
            {
                "rule": m.rule.name,
                "layers": {
                    k: {"weight": li.weight, "split": str(m.rule.split[k])}
                    for k, li in m.layers.items()
                },
            }
            for m in plan.matches
        ],  # fmt: skip
        "parameters": [
            {
                "name": r.name,
                "placement": r.kind,
                "rule": r.rule,
                "serial_shape": list(r.serial_shape),
                "local_shape": list(r.local_shape),
            }
            for r in params(plan)
        ],  # fmt: skip
        "collectives": [
            {
                "node": c.node,
                "kind": c.kind,
                "direction": c.direction,
                "module": c.module,
                "rule": c.rule,
                "elements": c.elements,
            }
            for c in communication(plan)
        ],  # fmt: skip
        "shape_edits": edits,
        "unmatched": [{"weight": w, "why": why} for w, why in unmatched_reasons(plan)],
        "replicated": [
            {
                "rule": m.rule.name,
                "weights": sorted(li.weight for li in m.layers.values()),
                "why": why,
            }
            for m, why in getattr(plan, "replicated", ())
        ],
    }


def regions_json(plan: ShownRegionPlan) -> dict[str, Any]:
    """A RegionPlan as plain data, for scripts: each region with its plan's own JSON."""
    programs: dict[int, int] = {}
    regions = []
    for r in plan.regions:
        ins, outs = r.boundary()
        regions.append({
            "path": r.path,
            "kind": r.kind,
            "class": r.cls.__name__,
            "program": programs.setdefault(r.program, len(programs)),
            "splits": {n: str(s) for n, s in sorted(r.splits.items())},
            "in": ins,
            "out": outs,
            "plan": to_json(r.plan),
        })  # fmt: skip
    return {
        "model": plan.model_name,
        "tp": plan.tp,
        "fingerprint": plan.fingerprint,
        "split_fraction": plan.split_fraction(),
        "regions": regions,
        "notes": plan.notes(),
    }
