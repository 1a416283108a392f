"""The public entry points that produce modules: `parallelize` (one rank of a process
group), `simulate` (all ranks in one process), and the serial views of their state:
`full_state_dict` and `full_grads`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from .build.materialise import RankInfo, RankOptions, build_rank_module, gather_over, rank_info
from .build.simulate import SimulatedTP
from .build.weights import Weights
from .capture.trace import Frontend
from .common.errors import AutoTPError, first_line
from .integrations.hf import is_region_model
from .integrations.hf_keys import Conversions
from .match.rule import Rule
from .planning.plan import Plan, check_tp, rules_or_default
from .planning.plan import plan as graph_plan
from .planning.region_plan import RegionPlan
from .regions.form import build_regions, plan_regions
from .regions.tensors import full_tensors
from .runtime.agree import check_first_call, same_random_state
from .runtime.comm import Comm, LocalComm, ProcessGroupComm, SimulatedComm
from .sharding import VocabOptions

__all__ = ["plan", "parallelize", "simulate", "full_state_dict", "full_grads", "Form", "Frontend"]

# how a model is planned: "regions" keeps its own Python and plans its layers, embedding
# and head one by one (a transformers model); "graph" traces it whole; "auto" picks
Form = Literal["auto", "graph", "regions"]


def plan(
    model: nn.Module,
    tp: int,
    example_inputs: Any = None,
    *,
    rules: Sequence[Rule] | None = None,
    vocab: VocabOptions | None = None,
    frontend: Frontend = "auto",
    strict: bool = False,
    sequence_parallel: bool = False,
    form: Form = "auto",
) -> Plan | RegionPlan:
    """What `parallelize(model, tp, ...)` with the same arguments runs, planned without
    weights (the meta device will do) and without a process group. For a model that
    keeps its own Python around its layers (a transformers model, `form="auto"` or
    `"regions"`) it is a RegionPlan: its layers, input embedding and output head, each
    planned on its own; else (`form="graph"`) a Plan of the whole traced graph (see
    `autotp.plan.plan` for the options). Print it to read it; pass it to `parallelize`
    or `simulate` in place of tp."""
    check_tp(tp)
    if _by_regions(model, tp, form, vocab):
        return plan_regions(model, tp, example_inputs, rules_or_default(rules), strict,
                            sequence_parallel)  # fmt: skip
    return _whole_graph(model, tp, example_inputs, rules, vocab, frontend, strict,
                        sequence_parallel)  # fmt: skip


def _whole_graph(
    model: nn.Module, tp: int, example_inputs: Any, rules: Sequence[Rule] | None,
    vocab: VocabOptions | None, frontend: Frontend, strict: bool, sequence_parallel: bool,
) -> Plan:  # fmt: skip
    """The whole-graph plan; where a model the region form takes (a transformers model)
    fails in it (its cache returned, by default, cannot be traced), the error names the
    region form."""
    try:
        return graph_plan(model, tp, example_inputs, rules=rules, vocab=vocab,
                          frontend=frontend, strict=strict,
                          sequence_parallel=sequence_parallel)  # fmt: skip
    except AutoTPError as e:
        if vocab is not None or not is_region_model(model):
            raise
        raise AutoTPError(
            f"the whole-graph form of {type(model).__name__} (one traced graph) failed: "
            f"{first_line(e)}\n\n{e}",
            hint='pass form="regions", the default for this model (its own Python, its cache '
            "and generate() kept, the layers planned one by one), or make the whole model "
            "traceable: model.config.use_cache = False when training",
        ) from e


def _the_plan(
    model: nn.Module, tp: int | Plan, example_inputs: Any, rules: Sequence[Rule] | None,
    vocab: VocabOptions | None, frontend: Frontend, strict: bool, sequence_parallel: bool,
) -> Plan:  # fmt: skip
    """`tp` as given (a Plan, checked to fit `model`) or the plan of `model` at tp ranks."""
    if not isinstance(tp, Plan):
        return _whole_graph(model, tp, example_inputs, rules, vocab, frontend, strict,
                            sequence_parallel)  # fmt: skip
    given = {
        "example_inputs": example_inputs is not None, "rules": rules is not None,
        "vocab": vocab is not None, "frontend": frontend != "auto", "strict": strict,
        "sequence_parallel": sequence_parallel,
    }  # fmt: skip
    if any(given.values()):
        names = ", ".join(k for k, v in given.items() if v)
        raise AutoTPError(f"a Plan already fixes {names}: pass them to autotp.plan, not here")
    tp.check_fits(model)
    return tp


def _the_regions(
    model: nn.Module, tp: int | RegionPlan, example_inputs: Any,
    rules: Sequence[Rule] | None, strict: bool, sequence_parallel: bool,
) -> RegionPlan:  # fmt: skip
    """`tp` as given (a RegionPlan; `build_regions` checks it fits) or the regions of
    `model` planned at tp ranks."""
    if not isinstance(tp, RegionPlan):
        return plan_regions(model, tp, example_inputs, rules_or_default(rules), strict,
                            sequence_parallel)  # fmt: skip
    if example_inputs is not None or rules is not None or strict or sequence_parallel:
        raise AutoTPError("a RegionPlan already fixes example_inputs, rules, strict and "
                          "sequence_parallel: pass them to autotp.plan, not here")  # fmt: skip
    return tp


def parallelize(
    model: nn.Module,
    tp: int | Plan | RegionPlan,
    example_inputs: Any = None,
    group: dist.ProcessGroup | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    vocab: VocabOptions | None = None,
    frontend: Frontend = "auto",
    strict: bool = False,
    form: Form = "auto",
    weights: str | os.PathLike[str] | None = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """This rank's module: the per-rank graph over new tensors holding this rank's shards,
    cut from `model`'s weights, so that it computes what `model` computes.

    `tp` is the number of ranks, or a Plan from `autotp.plan` (made on this model, or on
    one built the same way, e.g. on the meta device: planning needs no weights); the
    keyword options are then the plan's. Call it on every rank of `group` (default: the
    default process group), which must have exactly `tp` ranks. `model` is not modified.
    Every rank of the group computes the same batch: the first call checks that the ranks
    got equal inputs (and, for a transformers model, whose own Python runs on every rank,
    that they hold one random state: `parallelize` gives them rank 0's), and refuses
    otherwise.
    With tp=1 no process group is needed. Dropout streams are seeded from rank 0's
    `torch.initial_seed()`. `rules`: the rules to match (default: autotp.rules'
    DEFAULT_RULES). `strict`: refuse a matched block that cannot be proven instead of
    leaving it replicated (see `plan`). `sequence_parallel`: see `plan`; in the region
    form each layer hands its hidden state to the next split along the sequence, through
    the model's own Python (see autotp.runtime.handover).
    """
    given, tp = tp, tp.tp if isinstance(tp, (Plan, RegionPlan)) else tp
    check_tp(tp)
    comm: Comm
    if tp == 1 and (not dist.is_available() or not dist.is_initialized()):
        comm, rank = LocalComm(), 0
    else:
        if not dist.is_available() or not dist.is_initialized():
            raise AutoTPError(
                "autotp.parallelize needs an initialised process group: call "
                "torch.distributed.init_process_group (torchrun sets its environment), "
                "or use autotp.simulate(model, tp) to run every rank in this process"
            )
        size = dist.get_world_size(group)
        if size != tp:
            raise AutoTPError(
                f"the process group has {size} ranks but tp={tp}: pass a group of exactly "
                f"tp ranks (e.g. torch.distributed.new_group(ranks)) or tp={size}"
            )
        comm, rank = ProcessGroupComm(group), dist.get_rank(group)
    source = _weights(model, weights)
    meta = [n for n, t in model.named_parameters() if t.is_meta]
    if meta and source is None:
        raise AutoTPError(
            f"{type(model).__name__} has {len(meta)} parameters on the meta device (e.g. "
            f"{meta[0]}): there are no weights to cut shards from. Load or initialise the "
            "weights first (model.to_empty(device=...) then an init or a checkpoint), pass "
            "weights= its saved safetensors (each rank reads its own slices), or use "
            "autotp.plan, which works on the meta device, for planning"
        )
    seed = torch.initial_seed() % 2**62
    if _by_regions(model, given, form, vocab, frontend):
        assert not isinstance(given, Plan)  # _by_regions refuses a Plan with form="regions"
        regions = _the_regions(model, given, example_inputs, rules, strict, sequence_parallel)
        if isinstance(comm, ProcessGroupComm):
            # each rank planned on its own; the model's Python runs whole on every rank,
            # with the random state of each
            seed = _check_same_plan(regions.fingerprint, seed, group)
        module = build_regions(model, regions, [comm], seed, source)
        if isinstance(comm, ProcessGroupComm) and tp > 1:
            same_random_state(group)
            check_first_call(module, group, random_state=True)
        return module
    assert not isinstance(given, RegionPlan)  # _by_regions takes every RegionPlan
    p = _the_plan(model, given, example_inputs, rules, vocab, frontend, strict, sequence_parallel)
    if isinstance(comm, ProcessGroupComm):
        seed = _check_same_plan(p.fingerprint, seed, group)
    module = build_rank_module(model, p, rank, comm, RankOptions(seed=seed, weights=source))
    if isinstance(comm, ProcessGroupComm) and tp > 1:  # its dropout has streams of its own
        check_first_call(module, group, random_state=False)
    return module


def _weights(model: nn.Module, path: str | os.PathLike[str] | Weights | None) -> Weights | None:
    """The weights to read, with the model's base-model prefix (a task model over a base
    model's checkpoint, and the other way round); a source already made (a Weights, or an
    object read the same way: `find`, `read`, `missing`, `path`) as it is."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    prefix = getattr(model, "base_model_prefix", "")
    prefix = prefix if isinstance(prefix, str) else ""
    return Weights(path, prefix=prefix, conversions=lambda: Conversions.of(model))


def _check_same_plan(fingerprint: str, seed: int, group: dist.ProcessGroup | None) -> int:
    """Every rank planned on its own: refuse unless all planned the same. Returns rank
    0's seed, the one seed of the group (shared random streams agree); one exchange
    gives both."""
    both: list[tuple[str, int] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(both, (fingerprint, seed), group=group)
    prints = [b[0] if b is not None else None for b in both]
    differ = [r for r, f in enumerate(prints) if f != prints[0]]
    if differ:
        raise AutoTPError(
            f"the ranks planned different splits: ranks {differ} differ from rank 0 (plan "
            f"fingerprints {sorted(set(map(str, prints)))}).",
            hint="every rank must call "
            "parallelize with the same model structure, example input shapes and options "
            "(build the model the same way on every rank, e.g. after torch.manual_seed)",
        )
    first = both[0]
    assert first is not None
    return first[1]


def simulate(
    model: nn.Module,
    tp: int | Plan | RegionPlan,
    example_inputs: Any = None,
    *,
    rules: Sequence[Rule] | None = None,
    vocab: VocabOptions | None = None,
    frontend: Frontend = "auto",
    strict: bool = False,
    form: Form = "auto",
    weights: str | os.PathLike[str] | None = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """All ranks in one process, collectives computed in-process and autograd-exact.
    `tp` and the options as in `parallelize`. `model` is not modified. Split outputs kept
    local (`VocabOptions(gather_outputs=False)`) are shown whole: the ranks' slices
    concatenated and trimmed. `form`, `weights` and `sequence_parallel` as in
    `parallelize`."""
    source = _weights(model, weights)
    if _by_regions(model, tp, form, vocab, frontend):
        assert not isinstance(tp, Plan)  # _by_regions refuses a Plan with form="regions"
        regions = _the_regions(model, tp, example_inputs, rules, strict, sequence_parallel)
        seed = torch.initial_seed() % 2**62
        comms: list[Comm] = [SimulatedComm(regions.tp, r) for r in range(regions.tp)]
        return build_regions(model, regions, comms, seed, source)
    assert not isinstance(tp, RegionPlan)  # _by_regions takes every RegionPlan
    p = _the_plan(model, tp, example_inputs, rules, vocab, frontend, strict, sequence_parallel)
    tp = p.tp
    seed = torch.initial_seed() % 2**62
    options = RankOptions(seed=seed, weights=source)
    ranks = [build_rank_module(model, p, r, SimulatedComm(tp, r), options) for r in range(tp)]
    return SimulatedTP(ranks)


def _by_regions(
    model: nn.Module, tp: int | Plan | RegionPlan, form: str, vocab: VocabOptions | None,
    frontend: Frontend = "auto",
) -> bool:  # fmt: skip
    """Whether to parallelize `model` region by region (see `parallelize`'s `form`):
    always from a RegionPlan, which refuses the whole graph's options; never from a Plan
    (or with vocab=), which refuses form="regions"."""
    if form not in ("auto", "graph", "regions"):
        raise AutoTPError(f'form must be "auto", "graph" or "regions", got {form!r}')
    if isinstance(tp, RegionPlan):
        given = {"form": form == "graph", "vocab": vocab is not None,
                 "frontend": frontend != "auto"}  # fmt: skip
        if any(given.values()):
            names = ", ".join(k for k, v in given.items() if v)
            raise AutoTPError(
                f"a RegionPlan is the region form's plan: {names} cannot apply to it",
                hint='plan with autotp.plan(model, tp, form="graph", ...) for the whole-graph form',
            )
        return True
    graph_only = isinstance(tp, Plan) or vocab is not None
    if form == "regions" and graph_only:
        raise AutoTPError(
            'form="regions" plans each region on its own: a Plan and vocab= are of the whole '
            'graph: pass tp (or a RegionPlan), or use form="graph"'
        )
    return form == "regions" or (form == "auto" and not graph_only and is_region_model(model))


def _rank_modules(module: nn.Module) -> tuple[list[nn.Module], RankInfo]:
    if isinstance(module, SimulatedTP):
        return list(module.ranks), rank_info(module.ranks[0])
    info = getattr(module, "autotp", None)
    if isinstance(info, RankInfo):
        return [module], info
    raise AutoTPError(
        f"expected a module from autotp.parallelize or autotp.simulate, got {type(module).__name__}"
    )


def _assemble(
    module: nn.Module, tensors_of: Any, keys: list[str]
) -> dict[str, torch.Tensor | None]:
    ranks, info = _rank_modules(module)
    per_rank = [tensors_of(r) for r in ranks]
    sizes = info.plan.serial_sizes  # the unpadded size of each padded split dimension
    out: dict[str, torch.Tensor | None] = {}
    for key in keys:
        spec = info.splits.get(key)
        local = [t[key] for t in per_rank]
        if local[0] is None:
            out[key] = None
        else:
            out[key] = gather_over(local, spec, info.tp, info.comm, sizes.get(key))
    return out


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The serial model's state_dict (keys and shapes) from a parallel module. For a module
    from `parallelize` this is a collective: call it on every rank."""
    if hasattr(module, "autotp_regions"):
        return full_tensors(module, grads=False)  # type: ignore[return-value]
    ranks, _ = _rank_modules(module)
    keys = list(ranks[0].state_dict(keep_vars=True))
    return _assemble(module, lambda r: r.state_dict(keep_vars=True), keys)  # type: ignore[return-value]


def full_grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient in the serial model's form (None where none was
    computed), keyed by every name the parameter has. A collective for `parallelize`."""
    if hasattr(module, "autotp_regions"):
        return full_tensors(module, grads=True)
    ranks, _ = _rank_modules(module)
    keys = [n for n, _ in ranks[0].named_parameters(remove_duplicate=False)]

    def grads(r: nn.Module) -> dict[str, torch.Tensor | None]:
        return {n: p.grad for n, p in r.named_parameters(remove_duplicate=False)}

    return _assemble(module, grads, keys)
