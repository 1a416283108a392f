"""This rank's module for the runner, built as a library user's is: `autotp.plan` decides the
form, and the module is what `autotp.parallelize` gives for that plan.

    plan = planned(model, cfg.tp, example, cfg)        # a Plan or a RegionPlan
    rank = RankModule.build(model, plan, cfg, mesh, ...)
    rank.module, rank.random, rank.serial_state(), rank.evaluates

A transformers model gets the region form (its decoder layers, input embedding and output
head split, the model's own Python between them replicated; with --sp each layer hands
its hidden state to the next split along the sequence, as `autotp.plan` chooses too).
Every other model gets the whole-graph form, built on
the meta device where it can be and initialised one parameter at a time (each rank cuts
its shards from the serial initialisation).

The trainer, its checkpoints and its norms read the two forms through this one interface:
the serial name of every split tensor (`plan.splits`), the dropout streams a checkpoint
restores (`random`), the serial state_dict (`serial_state`), and whether eval mode runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import torch
import torch.fx as fx
import torch.nn as nn

from ..build.materialise import RankOptions, build_rank_module, rank_info
from ..parallel import full_state_dict, parallelize
from ..parallel import plan as public_plan
from ..planning.plan import Plan
from ..planning.region_plan import RegionPlan
from ..runtime.comm import ProcessGroupComm
from ..runtime.random import RankRandom
from .mesh import Mesh

__all__ = ["RankModule", "planned", "split_blocks", "left_replicated"]

_VOCAB_RULES = ("vocab_embedding", "lm_head")
# (stream, device) -> a generator's state: the dropout streams a checkpoint restores
_States: TypeAlias = dict[tuple[str, torch.device], torch.Tensor]


def planned(model: nn.Module, tp: int, example: Any, cfg: Any) -> Plan | RegionPlan:
    """What `autotp.plan` gives a library user for the run's options."""
    return public_plan(model, tp, example, strict=cfg.strict, sequence_parallel=cfg.sp)


def _graph_plans(plan: Plan | RegionPlan) -> list[Plan]:
    """The graph plans that run: the one plan, or each layer region's (once per region)."""
    if isinstance(plan, Plan):
        return [plan]
    return [r.plan for r in plan.regions]


def left_replicated(plan: Plan | RegionPlan) -> list[tuple[Any, str]]:
    """(matched block, why) for every matched block the plan leaves replicated."""
    return [m for p in _graph_plans(plan) for m in p.replicated]


def split_blocks(plan: Plan | RegionPlan) -> int:
    """How many matched MLP and attention blocks the plan splits (the vocabulary aside)."""
    out = 0
    for p in _graph_plans(plan):
        left = {id(m) for m, _ in p.replicated}
        out += sum(m.rule.name not in _VOCAB_RULES and id(m) not in left for m in p.matches)
    return out


class _RegionRandom:
    """The dropout streams of a region-form module, as a checkpoint saves them: its
    regions' streams (one set per rank, shared by the regions) and torch's default
    generators, which the model's own Python draws from between the regions (equal on the
    ranks of a TP group: `parallelize` gives them rank 0's)."""

    def __init__(self, random: RankRandom | None) -> None:
        self.random = random

    def get_state(self) -> _States:
        state = dict(self.random.get_state()) if self.random is not None else {}
        state[("torch", torch.device("cpu"))] = torch.get_rng_state()
        if torch.cuda.is_available():
            state[("torch", torch.device("cuda"))] = torch.cuda.get_rng_state()
        return state

    def set_state(self, state: _States) -> None:
        for (stream, device), s in state.items():
            if stream != "torch":
                continue
            if device.type == "cuda":
                torch.cuda.set_rng_state(s)
            else:
                torch.set_rng_state(s)
        if self.random is not None:
            self.random.set_state({k: v for k, v in state.items() if k[0] != "torch"})


@dataclass
class RankModule:
    """This rank's parallel module and what the runner reads of it in either form."""

    module: nn.Module
    plan: Plan | RegionPlan
    random: Any  # get_state() / set_state(dict): the streams a checkpoint restores

    @classmethod
    def build(
        cls, model: nn.Module, plan: Plan | RegionPlan, mesh: Mesh, seed: int,
        source: Any, init: Any, device: torch.device,
    ) -> RankModule:  # fmt: skip
        """The module of this rank's TP shards: from `source` (a checkpoint file's
        Weights, or the Drawn values of a model built from the seed) when given, else
        drawn by `init` (a meta model's initialiser, graph form) or cut from `model`'s own
        weights."""
        if isinstance(plan, RegionPlan):
            # the public path: checks the ranks planned alike and share one random state
            module = parallelize(model, plan, group=mesh.tp_group, weights=source)
            # what parallelize sets on a region form: its regions' paths, and each region's
            # ranks' dropout streams
            paths = cast("tuple[str, ...]", module.autotp_regions)
            regions = [module.get_submodule(p) for p in paths]
            randoms = cast("list[RankRandom]", regions[0]._autotp_randoms)[0] if regions else None
            return cls(module, plan, _RegionRandom(randoms))
        options = RankOptions(seed=seed, weights=source, device=device, init=init)
        module = build_rank_module(model, plan, mesh.tp_rank, ProcessGroupComm(mesh.tp_group),
                                   options)  # fmt: skip
        return cls(module, plan, rank_info(module).random)

    @property
    def regions(self) -> bool:
        return isinstance(self.plan, RegionPlan)

    @property
    def evaluates(self) -> bool:
        """Whether eval mode runs: a graph traced in train mode that depends on the mode
        runs in train mode only; a region form traces each mode it is called in."""
        return isinstance(self.plan, RegionPlan) or not self.plan.traced.mode_dependent

    def serial_state(self) -> dict[str, torch.Tensor]:
        """The serial model's state_dict (a collective: every rank calls it): FSDP's
        shards gathered over dp, then TP's over tp."""
        return {k: v.clone() for k, v in full_state_dict(self.module).items()}

    def unread_parameters(self) -> list[nn.Parameter]:
        """The parameters the module never reads (kept for its state_dict only): they can
        have no gradient. A region form's tensors are all its layers'."""
        if self.regions:
            return []
        gm = cast(fx.GraphModule, self.module)  # the whole-graph form: build_rank_module's
        read: set[int] = set()
        for n in gm.graph.nodes:
            if n.op not in ("get_attr", "call_module"):
                continue
            owner, _, leaf = str(n.target).rpartition(".")
            got = getattr(gm.get_submodule(owner), leaf)
            tensors = got.parameters() if isinstance(got, nn.Module) else [got]
            read.update(id(t) for t in tensors)
        return [p for p in dict.fromkeys(gm.parameters()) if id(p) not in read]
