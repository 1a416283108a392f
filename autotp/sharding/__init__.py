"""Stage 3, sharding: placements for every value of the traced graph, proven by one rule
table, or refused.

placement.py   the placements (R, S(d), S(d x b), P, local ints) and the result type
context.py     the propagation state and its helpers
layout.py      table entries for views, reshapes, indexing, splits and joins
compute.py     table entries for elementwise ops, reductions, matmul and attention
layers.py      table entries for split linears and embeddings, the loss, the outputs
driver.py      the driver: one pass over the graph, refusing what no entry proves

Takes the matched graph; gives a Propagation: each node's placement, where f and g go,
which shape constants change.
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
