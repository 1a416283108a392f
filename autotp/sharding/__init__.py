"""Sharding propagation (stage 3): placements for every value of the traced graph.

placement.py   the placements (R, S(d), S(d x b), P, local ints) and the result type
call.py        each op call canonicalised into one record, whatever its spelling
context.py     the propagation state and its helpers
layout.py      table entries for views, reshapes, indexing, splits and joins
compute.py     table entries for elementwise ops, reductions, matmul and attention
layers.py      table entries for split linears and embeddings, the loss, the outputs
driver.py      the driver: one pass over the graph, refusing what no entry proves
"""

from .driver import propagate
from .placement import (
    LOCAL,
    ArgEdit,
    Cut,
    DivideByTP,
    LocalInt,
    LossInfo,
    MultiplyByTP,
    Partial,
    Placement,
    Propagation,
    R,
    Replicate,
    Shard,
    VocabOptions,
    is_split,
)  # fmt: skip

__all__ = [
    "R", "LOCAL", "Replicate", "Shard", "Partial", "LocalInt", "Placement", "DivideByTP",
    "MultiplyByTP", "ArgEdit", "Cut", "Propagation", "VocabOptions", "LossInfo", "is_split",
    "propagate",
]  # fmt: skip
