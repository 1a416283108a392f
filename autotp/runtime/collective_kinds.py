"""Every kind of collective call site, declared once: the name of its module in a rank's
graph, the names its sites are recorded under (`NodeRecord.collective`), what one call
runs (each collective, forward or backward, and whether it sends only the rank's part),
the module a rank's graph calls, and its in-process version over every rank's values
(`simulate`). Whatever builds, simulates, counts or shows sites reads this table:

- materialise builds `KINDS[i].module_for(comm)` for each site (`site_modules`);
- simulate runs `simulated` (the parameters' f, whose call carries its groups, has its
  own step there);
- `Plan.collectives` counts the record names, the report sizes `runs`, and the views
  name each run by `RUN_TEXT` and each record name's count by `SHOWN`.

Adding a kind is adding an entry here; `tests/test_collective_kinds.py` checks that
every consumer handles every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

from .collectives import (
    CopyManyToTP,
    CopyToTP,
    GatherFromSP,
    GatherFromTP,
    ReduceFromTP,
    ReduceMaxTP,
    ReduceScatterToSP,
    ScatterToSP,
    simulated_copy_many,
    simulated_f,
    simulated_g,
    simulated_gather,
    simulated_gather_from_sp,
    simulated_max,
    simulated_reduce_scatter_to_sp,
    simulated_scatter_to_sp,
)
from .comm import Comm

Op = Literal["all_reduce", "all_reduce_max", "all_gather", "reduce_scatter"]
Direction = Literal["forward", "backward"]


@dataclass(frozen=True)
class Run:
    """One collective a site's call runs."""

    op: Op
    direction: Direction
    part: bool  # sends only the rank's part (an all-gather), not its whole summand


@dataclass(frozen=True)
class CollectiveKind:
    module: str  # its sites' modules in a rank's graph: `module.<node name>`
    names: tuple[str, ...]  # the names its sites are recorded under, the first by default
    runs: tuple[Run, ...]  # what one call runs
    module_for: Callable[[Comm], nn.Module]  # the module a rank's graph calls
    simulated: Callable[..., Any]  # over every rank's values, in one process
    always: tuple[str, ...]  # the names a plan counts even at zero (the others, those
    # of sequence parallelism, only where it has them)


_AR_BACK, _AR_FORWARD = Run("all_reduce", "backward", False), Run("all_reduce", "forward", False)
_AG_FORWARD, _AG_BACK = Run("all_gather", "forward", True), Run("all_gather", "backward", True)
_RS_FORWARD = Run("reduce_scatter", "forward", False)
_RS_BACK = Run("reduce_scatter", "backward", False)

F = CollectiveKind(  # identity forward, all-reduce backward
    module="tp_f", names=("f",), runs=(_AR_BACK,), module_for=CopyToTP,
    simulated=simulated_f, always=("f",),
)  # fmt: skip
G = CollectiveKind(  # all-reduce forward, identity backward
    module="tp_g", names=("g",), runs=(_AR_FORWARD,), module_for=ReduceFromTP,
    simulated=simulated_g, always=("g",),
)  # fmt: skip
MAX = CollectiveKind(  # the vocabulary-parallel loss's row max
    module="tp_max", names=("max",), runs=(Run("all_reduce_max", "forward", False),),
    module_for=ReduceMaxTP, simulated=simulated_max, always=("max",),
)  # fmt: skip
GATHER = CollectiveKind(  # a split value read whole ("sequence_gather": a sequence)
    module="tp_gather", names=("gather", "sequence_gather"), runs=(_AG_FORWARD,),
    module_for=GatherFromTP, simulated=simulated_gather, always=("gather",),
)  # fmt: skip
# sequence parallelism: Megatron-LM's conjugate pair and its companion
REDUCE_SCATTER = CollectiveKind(  # g's place: reduce-scatter, all-gather back
    module="tp_reduce_scatter", names=("reduce_scatter",), runs=(_RS_FORWARD, _AG_BACK),
    module_for=ReduceScatterToSP, simulated=simulated_reduce_scatter_to_sp, always=(),
)  # fmt: skip
SP_GATHER = CollectiveKind(  # f's place: all-gather, reduce-scatter back (gathered
    # again in backward, autograd keeping the rank's part: not under torch.compile or the
    # caller's own saved-tensor hooks)
    module="tp_sp_gather", names=("sp_gather",), runs=(_AG_FORWARD, _AG_BACK, _RS_BACK),
    module_for=GatherFromSP, simulated=simulated_gather_from_sp, always=(),
)  # fmt: skip
SCATTER = CollectiveKind(  # a replicated term joins a sequence split: slice
    module="tp_scatter", names=("scatter",), runs=(_AG_BACK,), module_for=ScatterToSP,
    simulated=simulated_scatter_to_sp, always=(),
)  # fmt: skip
F_PARAMS = CollectiveKind(  # f of every parameter split compute reads, at once
    module="tp_f_params", names=("f",), runs=(_AR_BACK,), module_for=CopyManyToTP,
    simulated=simulated_copy_many, always=(),
)  # fmt: skip

KINDS: tuple[CollectiveKind, ...] = (F, G, MAX, GATHER, REDUCE_SCATTER, SP_GATHER, SCATTER,
                                     F_PARAMS)  # fmt: skip
# what a site recorded under a name runs (names shared by two kinds run alike)
RUNS: dict[str, tuple[Run, ...]] = {n: k.runs for k in KINDS for n in k.names}
# the names a plan counts, in order; those not in ALWAYS only where it has them
NAMES: tuple[str, ...] = tuple(dict.fromkeys(n for k in KINDS for n in k.names))
ALWAYS = frozenset(n for k in KINDS for n in k.always)
RUN_TEXT: dict[tuple[str, str], str] = {
    ("all_reduce", "forward"): "g: all-reduce forward",
    ("all_reduce", "backward"): "f: all-reduce backward",
    ("all_reduce_max", "forward"): "all-reduce max forward",
    ("all_gather", "forward"): "all-gather forward",
    ("all_gather", "backward"): "all-gather backward",
    ("reduce_scatter", "forward"): "reduce-scatter forward",
    ("reduce_scatter", "backward"): "reduce-scatter backward",
}


# how the plan's one-line summary names each record name's count, in the order it shows
# them, by group: every plan's own f and g, the loss and output collectives where a plan
# has them, sequence parallelism's where it has them
Group = Literal["tensor", "loss", "sequence"]
SHOWN: dict[str, tuple[Group, str]] = {
    "g": ("tensor", "all-reduce forward (g)"),
    "f": ("tensor", "all-reduce backward (f)"),
    "max": ("loss", "all-reduce max (loss)"),
    "gather": ("loss", "all-gather (outputs)"),
    "reduce_scatter": ("sequence", "reduce-scatter forward (all-gather backward)"),
    "sp_gather": ("sequence", "all-gather forward (reduce-scatter backward)"),
    "sequence_gather": ("sequence", "sequence read whole"),
    "scatter": ("sequence", "scattered term"),
}


def site_modules(comm: Comm) -> dict[str, Callable[[], nn.Module]]:
    """Each kind's module name -> a maker of the module a rank's graph calls there."""
    return {k.module: _maker(k, comm) for k in KINDS}


def _maker(kind: CollectiveKind, comm: Comm) -> Callable[[], nn.Module]:
    """A maker of `kind`'s module over `comm`."""
    return lambda: kind.module_for(comm)


__all__ = ["CollectiveKind", "KINDS", "NAMES", "RUNS", "RUN_TEXT", "SHOWN", "Run",
           "ALWAYS", "site_modules"]  # fmt: skip
