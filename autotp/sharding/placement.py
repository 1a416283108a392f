"""Placements, and what sharding propagation hands to the rewrite.

Each value gets a placement:
  R             the full value, identical on every rank (ints: the serial value)
  S(d)          split along dimension d: rank r holds the r-th of tp equal slices
  S(d x b)      split along d inside each of b equal parts (a fused Q|K|V output)
  P             partial: each rank holds a summand and the value is their sum (a row-split
                linear's output, a vocabulary-split lookup), with replicated terms to add
                once after the sum (its bias, a residual)
  local int     an int whose value on every rank is (serial value) / tp, e.g. a split size

Between them, one redistribution: P -> R is g (all-reduce forward), inserted where a
partial value is read whole; R -> S(d) is a cut (each rank reads its slice, no
communication) where a replicated value meets split compute along a dimension it spans;
the gradient side of R read by split compute is f (all-reduce backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
import torch.fx as fx

from ..match.patterns import EmbeddingInfo, LinearInfo
from ..match.rule import Split

__all__ = [
    "R", "LOCAL", "Replicate", "Shard", "Partial", "LocalInt", "Placement", "DivideByTP",
    "MultiplyByTP", "ArgEdit", "Cut", "Propagation", "VocabOptions", "LossInfo", "is_split",
]  # fmt: skip


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int
    parts: int = 1
    padded: int | None = None  # the dimension is padded to this serial size first (vocab)
    # the dimension has tp / replicas slices, each held by `replicas` neighbouring ranks
    # (the key/value heads a rank's query heads read: a cut of a replicated value, or a
    # key/value projection's weight, whose ranks then sum their gradients)
    replicas: int = 1
    # unequal parts (their serial sizes, in order; parts stays 1): rank r holds the r-th
    # 1/tp of each, concatenated (a fused Q|K|V with fewer key/value heads than queries)
    sections: tuple[int, ...] = ()
    # with sections: how many neighbouring ranks hold each slice of each part (a fused
    # Q|K|V with fewer key/value heads than ranks: the query part split over all ranks,
    # each key/value head held by the ranks whose query heads read it); () : `replicas`
    part_replicas: tuple[int, ...] = ()

    def replicas_of(self, part: int) -> int:
        """How many neighbouring ranks hold each slice of part `part`."""
        return self.part_replicas[part] if self.part_replicas else self.replicas

    def slices(self, tp: int) -> int:
        """Into how many slices the dimension is cut over `tp` ranks."""
        return tp // self.replicas

    def ranges(self, size: int, rank: int, tp: int) -> list[tuple[int, int]]:
        """[start, stop) of rank `rank`'s slice of each part of a serial dimension of
        `size` (padded first, where `padded`): its slice of tp / replicas (of that part)."""
        out = []
        for i, (start, length) in enumerate(self.pieces(size)):
            g = self.replicas_of(i)
            at, step = rank // g, length // (tp // g)
            out.append((start + at * step, start + (at + 1) * step))
        return out

    def pieces(self, size: int) -> list[tuple[int, int]]:
        """(start, length) of each part of a serial dimension of `size`."""
        if not self.sections:
            return [(b * (size // self.parts), size // self.parts) for b in range(self.parts)]
        starts = [sum(self.sections[:i]) for i in range(len(self.sections))]
        return list(zip(starts, self.sections, strict=True))

    def local_size(self, size: int, tp: int) -> int:
        """A rank's length of a serial (padded) dimension of `size`."""
        return sum(hi - lo for lo, hi in self.ranges(size, 0, tp))

    def held(self, tp: int) -> tuple[tuple[int, int], ...]:
        """(length, ranks holding it) of each part of a rank's slice along the dimension,
        where its parts are held by different numbers of ranks (part_replicas): their
        gradients are summed among those ranks, and counted once in a norm."""
        held = zip(self.sections, self.part_replicas, strict=True)
        return tuple((size // (tp // g), g) for size, g in held)

    def serial_size(self, local: int, tp: int) -> int:
        """The serial (padded) size of a dimension a rank holds `local` of."""
        return sum(self.sections) if self.sections else local * self.slices(tp)

    def __str__(self) -> str:
        if self.sections:
            held = ""
            if self.part_replicas:
                held = f", held by {'|'.join(map(str, self.part_replicas))} ranks"
            return f"S({self.dim} in parts {'|'.join(map(str, self.sections))}{held})"
        s = f"S({self.dim})" if self.parts == 1 else f"S({self.dim}x{self.parts})"
        if self.replicas > 1:
            s = f"{s[:-1]}, {self.replicas} ranks each)"
        return s if self.padded is None else f"{s[:-1]}, pad {self.padded})"


@dataclass(frozen=True)
class Partial:
    """Each rank holds a summand; the value is the sum over ranks. `pending` are replicated
    terms added once after the sum, in order: a row-split linear's bias (a parameter name)
    or a replicated value the partial one was added to (a node: a residual, a bias added
    by a separate op), so that the sum of two partial values needs only one all-reduce."""

    pending: tuple[str | fx.Node, ...] = ()

    def __str__(self) -> str:
        if not self.pending:
            return "P"
        if len(self.pending) == 1 and isinstance(self.pending[0], str):
            return "P + bias"
        return f"P + {len(self.pending)} terms"


@dataclass(frozen=True)
class LocalInt:
    padded: bool = False  # the size of a padded split dimension: padded / tp
    replicas: int = 1  # of a dimension split into tp / replicas slices (Shard.replicas)

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
    local_outputs: positions of output leaves (negative from the end) kept each rank's
        own even when the rest is gathered (a decoder layer's new keys and values, for
        its rank's cache).
    sequence_inputs: inputs (by placeholder name) that arrive split along the sequence
        (dimension 1), as the previous layer handed them over (sequence parallelism).
    hand_over: positions of output leaves (from the start) returned split along the
        sequence when they are (the layer's hidden state, for the next layer), not
        gathered.
    """

    multiple: int = 128
    gather_outputs: bool = True
    local_outputs: tuple[int, ...] = ()
    sequence_inputs: tuple[str, ...] = ()
    hand_over: tuple[int, ...] = ()

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
    reduction: Literal["mean", "sum", "none"]  # torch's cross_entropy reduction
    logits_at: tuple[int | str, ...]  # where the logits and the targets sit in the call
    target_at: tuple[int | str, ...]


R = Replicate()
LOCAL = LocalInt()
# a value's placement; a tuple value (a split's outputs, an attention's (out, weights)) has
# a tuple of its items' placements
Placement: TypeAlias = Replicate | Shard | Partial | LocalInt | tuple["Placement", ...]


@dataclass(frozen=True)
class DivideByTP:
    """Edit marker: replace the argument (an int node) by `arg // (tp // replicas)`, its
    size on a rank of a dimension split that way."""

    source: fx.Node
    replicas: int = 1


@dataclass(frozen=True)
class MultiplyByTP:
    """Edit marker: replace the argument (an int node) by `arg * tp`: a sequence length
    read from a sequence-split value (its local length) where the serial one is meant."""

    source: fx.Node


@dataclass(frozen=True)
class ArgEdit:
    """Rewrite one shape argument of `node`: at `path` (args index or kwargs key, then
    indices into nested lists), `old` becomes `new` (an int, or DivideByTP)."""

    node: fx.Node
    path: tuple[int | str, ...]
    old: Any
    new: Any


@dataclass(frozen=True)
class Cut:
    """Replicate -> Shard without communication: `consumer` reads this rank's slice of
    `value`, which every rank holds whole, split as `shard` (in `value`'s dimensions).
    `within`: `value` is already split along that dimension, each slice held by `within`
    neighbouring ranks; the cut divides a slice among them (`shard.replicas` each)."""

    value: fx.Node
    consumer: fx.Node
    shard: Shard
    within: int | None = None


SizeFacts = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]


@dataclass
class Propagation:
    """The result of propagation: placements, what to shard, where to communicate."""

    placements: dict[fx.Node, Placement]
    params: dict[str, Shard]  # qualified parameter name -> its split (absent: replicated)
    f_inputs: dict[fx.Node, list[fx.Node]]  # value needing f -> consumers that read it split
    edits: list[ArgEdit]
    splits: dict[fx.Node, tuple[Split, LinearInfo | EmbeddingInfo]]
    param_users: dict[str, fx.Node] = field(default_factory=dict)
    losses: dict[fx.Node, LossInfo] = field(default_factory=dict)  # -> vocab-parallel CE
    # split values the model returns: (split, serial size: None for a sequence handed
    # over, each call's own length); gathered unless kept local
    gathers: dict[fx.Node, tuple[Shard, int | None]] = field(default_factory=dict)
    gather_outputs: bool = True
    # partial value -> consumers that read its sum (one g each, shared by the consumers)
    reduces: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    # `p + r` (r replicated) kept partial: the node passes p through, r joins p's pending
    deferred: dict[fx.Node, fx.Node] = field(default_factory=dict)
    cuts: list[Cut] = field(default_factory=list)
    local_outputs: tuple[int, ...] = ()  # output leaf positions kept local regardless
    # sequence parallelism: partial value -> the sequence split its readers see (its sum
    # reduce-scattered, not all-reduced); sequence-split value -> readers that read it
    # whole (all-gathered first); norm modules on split values, run in functional form
    scatters: dict[fx.Node, Shard] = field(default_factory=dict)
    sequence_gathers: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    functional_norms: set[fx.Node] = field(default_factory=set)
    # reshape -> the sizes its proof read, checked on every call: ((dim, size), ...) of its
    # input, then of its output (heads folded into a batch of 1 are a split at batch 1 only)
    guards: dict[fx.Node, SizeFacts] = field(default_factory=dict)
    # sequence parallelism between layers: output leaf positions (negative, from the end;
    # among local_outputs) returned split along the sequence, for the next layer
    handed_over: tuple[int, ...] = ()
    # means and sums over a split dimension (an RMSNorm over split features) -> the
    # divisor that makes each rank's mean (sum) of its slice its summand of the serial
    # one (a partial value): tp for a mean, the ranks holding each slice for a sum
    means: dict[fx.Node, int] = field(default_factory=dict)  # (ordered: one plan everywhere)


def is_split(p: Placement) -> bool:
    """Does any part of the placement differ between ranks?"""
    if isinstance(p, (Shard, Partial, LocalInt)):
        return True
    return isinstance(p, tuple) and any(is_split(x) for x in p)


def cut(t: torch.Tensor, spec: Shard | None, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard of the serial tensor `t` (a view where possible); a padded
    dimension is first extended with zeros to `spec.padded`."""
    if spec is None:
        return t
    if spec.padded is not None and spec.padded != t.shape[spec.dim]:
        shape = list(t.shape)
        shape[spec.dim] = spec.padded - t.shape[spec.dim]
        t = torch.cat([t, t.new_zeros(shape)], dim=spec.dim)
    cuts = [t.narrow(spec.dim, lo, hi - lo) for lo, hi in spec.ranges(t.shape[spec.dim], rank, tp)]
    return cuts[0] if len(cuts) == 1 else torch.cat(cuts, dim=spec.dim)
