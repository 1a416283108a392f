"""What a rule is: a pattern over the normalised op vocabulary plus a declarative split.

A rule never carries graph surgery. It says *what* it matches (one or more small graphs,
one per spelling of the same structure) and *how each matched linear splits*; the shared
propagation (sharding/) proves the split correct and the shared rewriter (rewrite.py)
applies it.

Pattern nodes are ops of the matcher's vocabulary:
  "linear"  a weight-parameter linear in any spelling (nn.Linear, F.linear, x @ W, addmm)
  "matmul"  a product of two activations (q @ k^T)
  "sdpa"    F.scaled_dot_product_attention
  "glue"    a maximal connected region of elementwise, softmax and layout ops
  "norm"    a layer norm
  "embedding"      a lookup in a weight table (nn.Embedding, F.embedding)
  "cross_entropy"  F.cross_entropy / nn.CrossEntropyLoss
  "output"         the graph's output
An edge (a, b, i) says that a's value reaches b's argument i (None: any argument). A glue
node may be limited to `inputs` external tensor inputs, e.g. an activation function
between two linears has exactly one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

__all__ = ["Column", "Row", "Rule", "Split", "Vocab", "column", "row", "vocab", "pattern"]


@dataclass(frozen=True)
class Column:
    """Split the output features: rank r keeps rows r/tp of the weight (of each of
    `parts` equal parts, for fused projections such as Q|K|V). `replicas` > 1: the rows
    are cut into tp / replicas slices, each held by that many neighbouring ranks, whose
    gradients are summed (the key/value projections when there are fewer key/value heads
    than ranks: each rank holds the heads its query heads read)."""

    parts: int = 1
    replicas: int = 1
    # per part of a fused projection read as parts of unequal widths (Phi-3's Q|K|V): how
    # many ranks hold each slice of it (the key and value parts with fewer heads than
    # ranks: each rank holds the heads its query heads read); () : `replicas` for all
    part_replicas: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.part_replicas and len(self.part_replicas) != self.parts:
            raise ValueError(f"part_replicas {self.part_replicas} names not {self.parts} parts")

    def __str__(self) -> str:
        s = "column" if self.parts == 1 else f"column ({self.parts} parts)"
        if self.part_replicas:
            return f"{s}, held by {'|'.join(map(str, self.part_replicas))} ranks"
        return s if self.replicas == 1 else f"{s}, {self.replicas} ranks each"


@dataclass(frozen=True)
class Row:
    """Split the input features: each rank computes a partial sum; an all-reduce follows,
    then the bias."""

    def __str__(self) -> str:
        return "row"


@dataclass(frozen=True)
class Vocab:
    """Split along the vocabulary: an embedding's rows, or an output layer's output
    features (logits per vocabulary slice). The vocabulary is padded to a multiple of
    `VocabOptions.multiple x tp`; padded rows never affect the result."""

    def __str__(self) -> str:
        return "vocab"


Split = Column | Row | Vocab
column = Column()
row = Row()
vocab = Vocab()


def pattern(
    nodes: Mapping[str, str | tuple[str, int]],
    edges: list[tuple[str, str, int | None]],
) -> nx.DiGraph:
    """Build a pattern graph. `nodes` maps a name to an op, or to (op, max inputs)."""
    g = nx.DiGraph()
    for name, spec in nodes.items():
        op, inputs = (spec, None) if isinstance(spec, str) else spec
        g.add_node(name, op=op, inputs=inputs)
    for a, b, pos in edges:
        if a not in g or b not in g:
            raise ValueError(f"pattern edge {a}->{b} names an unknown node")
        if not g.has_edge(a, b):
            g.add_edge(a, b, args=set())
        if pos is not None:  # several positions between one pair: all must be fed
            g.edges[a, b]["args"].add(pos)
    return g


@dataclass(frozen=True, kw_only=True)
class Rule:
    """A named structure: alternative patterns (spellings) and the split of its linears."""

    name: str
    patterns: tuple[nx.DiGraph, ...]
    split: Mapping[str, Split]
    motivation: str = ""
    # Optional condition on a candidate match (match.Match), given the match.Context: the
    # graph's layers and the matches accepted so far (e.g. the input embedding is split
    # only if an output layer over the same vocabulary was).
    accept: Callable[[Any, Any], bool] | None = field(default=None)
    # Narrower splits to try in order when propagation cannot prove `split`: fewer ranks
    # per slice of a layer (Column.replicas), or fewer layers, those left out replicated
    # (Megatron replicates the key/value projections when there are fewer key/value heads
    # than ranks); the block is left whole only if the last fails too.
    fallback: tuple[Mapping[str, Split], ...] = ()

    def __post_init__(self) -> None:
        if any(not set(f) <= set(self.split) for f in self.fallback):
            raise ValueError(f"rule {self.name}: a fallback may only split its layers")
        for p in self.patterns:
            for name, how in self.split.items():
                ops = ("linear", "embedding") if isinstance(how, Vocab) else ("linear",)
                if name not in p or p.nodes[name]["op"] not in ops:
                    raise ValueError(f"rule {self.name}: cannot split {name!r} as {how}")
