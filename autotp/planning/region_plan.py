"""A RegionPlan: the plan of a model that keeps its own Python (a transformers model),
made of regions. A region is a module whose forward is traced, matched, proven and
rewritten on its own (a decoder layer, the input embedding, the output head), with the
placements at its boundary: what comes in and what goes out. Between regions the model's
own Python runs, replicated on every rank. Regions that are one program (the same
structure, the same ops with the same numbers, the same hooks) share one plan.

`autotp.plan` returns one for such a model, and `parallelize`/`simulate` build from it
(the plan they run is the plan printed: same fingerprint). Planning reads no values, so a
plan made on the meta device serves a model with weights built the same way.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..common.errors import first_line
from ..common.tensor_names import with_every_name
from ..integrations.hf import VocabRegions
from ..sharding import Partial, Shard, is_split
from ..show.shown import RegionKind
from .plan import Plan, Signature, check_signature

__all__ = ["Region", "RegionPlan", "RegionKind", "Patterns"]


class Patterns(Protocol):
    """The plans of one region program, by call pattern (regions.form keeps them, and
    plans a new pattern when a call needs one)."""

    @property
    def shown(self) -> Plan:
        """The plan a prompt runs: what the region's plan prints, counts and digests."""
        ...


@dataclass(frozen=True, eq=False)
class Region:
    """One region: its module path, what it is, and its plans by call pattern (shared by
    the regions of one program; `plan` is the first, made from the model's own call)."""

    path: str
    kind: RegionKind
    cls: type
    patterns: Patterns  # the plans of its program, by call pattern
    shapes: dict[str, torch.Size]  # serial shape of each tensor, by its name in the region
    aliases: tuple[tuple[str, ...], ...]  # the names of one tensor, where it has several

    @property
    def plan(self) -> Plan:
        return self.patterns.shown

    @property
    def program(self) -> int:
        """Equal for regions of one program (they share their patterns and plans)."""
        return id(self.patterns)

    @property
    def splits(self) -> dict[str, Shard]:
        """Split tensors by their name in the region (every name of a tied tensor)."""
        named = {k.removeprefix("layer."): v for k, v in self.plan.splits.items()}
        return with_every_name(named, self.aliases)

    def boundary(self) -> tuple[list[str], list[str]]:
        """The placements of the region's inputs and outputs in the plan a prompt runs: R
        (replicated: the same on every rank), or a split each rank holds its own part
        of (a layer's new keys and values, for its rank's cache). Split outputs the
        model's Python reads are gathered, and shown as R (gathered)."""
        p = self.plan
        prop = p.propagation
        places = prop.placements
        ins = [_shown(places.get(n)) for n in p.traced.gm.graph.nodes if n.op == "placeholder"]
        leaves = tree_flatten(p.traced.gm.graph.output_node().args[0])[0]
        outs = []
        for i, n in enumerate(leaves):
            if not isinstance(n, fx.Node):
                outs.append("const")
            elif (
                n in prop.gathers
                and prop.gather_outputs
                and (i - len(leaves) not in prop.local_outputs)
            ):
                outs.append("R (gathered)")
            elif (
                isinstance(places.get(n), Partial)
                and n in prop.gathers
                and (i - len(leaves) in prop.handed_over)
            ):  # handed over: reduce-scattered along the sequence
                outs.append(f"{_shown(prop.gathers[n][0])} (reduce-scattered)")
            elif isinstance(places.get(n), Partial):  # summed (g) before it leaves
                outs.append("R (summed)")
            else:
                outs.append(_shown(places.get(n)))
        return ins, outs


def _shown(placement: Any) -> str:
    return "R" if placement is None or not is_split(placement) else str(placement)


@dataclass(frozen=True, eq=False)
class RegionPlan:
    """How a model that keeps its own Python splits over `tp` ranks, region by region.
    Build it with `autotp.plan`; pass it to `autotp.parallelize` or `autotp.simulate`."""

    model_name: str
    tp: int
    regions: tuple[Region, ...]
    vocab: VocabRegions
    signature: Signature  # plan.model_signature of the model planned
    sequence_parallel: bool = False  # the hidden state handed over split between layers

    def __deepcopy__(self, memo: dict[int, Any]) -> RegionPlan:
        return self  # pure data about the model, never changed: a copied module shares it

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of every region's path and plan: equal in every process that planned
        the same model the same way (`parallelize` checks it across ranks)."""
        h = hashlib.sha256(repr(self.tp).encode())
        for r in self.regions:
            h.update(f"{r.path}:{r.plan.fingerprint};".encode())
        return h.hexdigest()[:16]

    @property
    def splits(self) -> dict[str, Shard]:
        """Every split tensor by its name in the model."""
        return {f"{r.path}.{n}": s for r in self.regions for n, s in r.splits.items()}

    def split_fraction(self) -> float:
        """The fraction of the model's parameter and buffer elements that are split, a
        tied tensor counted once."""
        shapes = dict(self.signature[0])
        for names in self.signature[1]:  # a tied tensor: its first name only
            for n in names[1:]:
                shapes.pop(n, None)
        total = sum(_numel(s) for s in shapes.values())
        split = sum(_numel(shapes[n]) for n in self.splits if n in shapes)
        return split / total if total else 0.0

    def check_fits(self, model: nn.Module) -> None:
        """Refuse `model` unless it has the tensors this plan was made for."""
        check_signature(self.model_name, self.signature, model)

    def collectives(self) -> dict[str, int]:
        """Collective call sites in one forward from the model's own call: each region's
        first plan, counted once per region (f, g, max, gather). An f on a value that
        needs no gradient (rotary tables) communicates nothing."""
        out: dict[str, int] = {}
        for r in self.regions:
            for k, v in r.plan.collectives().items():
                out[k] = out.get(k, 0) + v
        return out

    def groups(self) -> list[list[Region]]:
        """The regions in order, consecutive regions of one program together."""
        out: list[list[Region]] = []
        for r in self.regions:
            if out and out[-1][0].patterns is r.patterns:
                out[-1].append(r)
            else:
                out.append([r])
        return out

    def notes(self) -> list[str]:
        """What the plan leaves whole or computes otherwise than Megatron, and why."""
        out = []
        if self.sequence_parallel:
            out.append(
                "sequence parallel: each layer (and the input embedding) hands its hidden "
                "state to the next split along the sequence, through the model's own "
                "Python (which passes it on; where it reads it, an all-gather); shown: each "
                "layer's pattern with its input handed over, as a prompt runs it"
            )
        if self.vocab.note:
            out.append(f"vocabulary: {self.vocab.note}")
        if self.vocab.head is not None:
            out.append(
                "loss: the model's own loss function, on the gathered logits (not the "
                "vocabulary-parallel cross-entropy: the model computes its loss outside "
                "the head)"
            )
        for r in self.regions:
            for m, why in r.plan.replicated:
                out.append(f"{r.path}: {m.rule.name} left replicated: {first_line(why)}")
        return out

    def __rich__(self) -> Any:
        from ..show.render import region_summary

        return region_summary(self)

    def __str__(self) -> str:
        from ..show.render import to_text

        return to_text(self.__rich__())

    __repr__ = __str__


def _numel(shape: tuple[int, ...] | torch.Size) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
