"""Stage 5, materialise: build one rank's module from the per-rank graph and the serial weights.

Each parameter is cut from the serial tensor by its split (sharding.Shard) and copied into a
new Parameter; replicated ones are copied whole. Tied weights stay tied: one new tensor per
serial tensor, installed under every name that shared it. The user's model is only read.
A model on the meta device gives meta shards (nothing allocated), which is how plans for
large configurations are sized without weights.

`gather` is the inverse of `cut`: from the tp shards it rebuilds the serial tensor.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ..common.errors import AutoTPError, node_error
from ..planning.plan import Plan
from ..rewrite.sites import (
    DROPOUT_MODULES,
    RANK_BUFFER,
    SP_GATHER_MODULE,
    record,
    site_kind,
)
from ..runtime.collective_kinds import site_modules
from ..runtime.collectives import (
    Comm,
    keep_parts,
)
from ..runtime.comm import ProcessGroupComm
from ..runtime.grads import count_norms
from ..runtime.random import RankRandom, StreamDropout
from ..sharding import Shard
from ..sharding.placement import cut
from .dcp_shards import shard_states
from .weights import Weights

__all__ = [
    "RankInfo", "RankOptions", "rank_info", "gather", "gather_over", "rank_shard", "as_like",
    "build_rank_module", "check_mode",
]  # fmt: skip


@dataclass(frozen=True)
class RankInfo:
    """Attached to every per-rank module as `module.autotp`."""

    rank: int
    tp: int
    comm: Comm
    splits: dict[str, Shard]  # state_dict key -> its split; absent keys are replicated
    plan: Plan  # the plan this module was built from
    random: RankRandom  # the dropout streams of this rank
    # the train/eval flag of every submodule as built, for a model whose graph depends on
    # the mode (plan.traced.mode_dependent): it runs only in that mode
    modes: tuple[bool, ...] = ()


def rank_info(module: nn.Module) -> RankInfo:
    """What a rank module built by `build_rank_module` knows of itself (`module.autotp`)."""
    info = module.__dict__.get("autotp")
    if not isinstance(info, RankInfo):
        raise AutoTPError(
            f"expected a module from autotp.parallelize or autotp.simulate, got "
            f"{type(module).__name__}"
        )
    return info


def check_mode(gm: nn.Module) -> None:
    """Refuse to run a rank module in another mode than it was planned in, when the
    model's traced graph depends on the mode (Python that branches on self.training)."""
    info = rank_info(gm)
    why = info.plan.traced.mode_dependent
    if why is None or tuple(m.training for m in gm.modules()) == info.modes:
        return
    mode = "train" if info.modes and info.modes[0] else "eval"
    raise AutoTPError(
        f"this parallel module was planned with the model in {mode} mode (per module, as "
        f"the model was), and the model's forward depends on the mode ({why}): tracing "
        "froze that choice, so it cannot run in another mode.",
        hint="call model.train() "
        "or model.eval() before autotp.parallelize / autotp.simulate, and build one parallel "
        "module per mode (they can share nothing but the serial weights)",
    )


def rank_shard(
    src: torch.Tensor, names: list[str], spec: Shard | None, rank: int, tp: int,
    weights: Weights | None = None, init: Callable[[str, torch.Tensor], None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Rank `rank`'s shard of the tensor known by `names` (a tied tensor has several), of
    its own memory: read from `weights` where they hold it, else cut from `src`. A meta
    `src` is filled whole by `init(names[0], tensor)` (the model's own initialiser, one
    tensor at a time) and cut; without either it stays on meta."""
    stored = weights.find(names) if weights is not None else None
    if stored is not None:
        return weights.read(stored, spec, rank, tp, src.dtype, tuple(src.shape))  # type: ignore[union-attr]
    if src.is_meta and weights is not None:
        raise weights.missing(names[0])
    if src.is_meta and init is not None:
        full = torch.empty(src.shape, dtype=src.dtype)
        init(names[0], full)
        return cut(full, spec, rank, tp).clone()
    return cut(src.detach(), spec, rank, tp).clone()


def as_like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` as what `t` is: a Parameter (with t's requires_grad) or a plain tensor."""
    return (
        nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    )


def gather_over(
    local: list[torch.Tensor], spec: Shard | None, tp: int, comm: Comm,
    serial_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The serial tensor from the shards at hand: every rank's (simulate), or this rank's
    alone, all-gathered over `comm`'s group (a collective: every rank calls it). A shard
    that data parallelism sharded further (an FSDP DTensor) is made whole first."""
    local = [whole_over_dp(t) for t in local]
    if spec is None:
        return local[0].detach()
    if len(local) == 1 and tp > 1:
        t = local[0].detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t, group=comm.group)  # type: ignore[attr-defined]
        local = parts
    return gather([t.detach() for t in local], spec, serial_size)


def whole_over_dp(t: torch.Tensor) -> torch.Tensor:
    """`t` as this rank holds it for tensor parallelism: an FSDP DTensor (sharded over
    data parallelism) gathered into its full tensor (a collective), else `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather(
    shards: list[torch.Tensor], spec: Shard | None, serial_size: int | None = None
) -> torch.Tensor:
    """The serial tensor from every rank's shard (inverse of `cut`, padding removed)."""
    if spec is None:
        return shards[0]
    tp, dim = len(shards), spec.dim
    size = spec.serial_size(shards[0].shape[dim], tp)
    placed: dict[int, torch.Tensor] = {}  # serial start -> the first rank's run there
    for rank, s in enumerate(shards):
        at = 0
        for lo, hi in spec.ranges(size, rank, tp):
            placed.setdefault(lo, s.narrow(dim, at, hi - lo))
            at += hi - lo
    full = torch.cat([placed[lo] for lo in sorted(placed)], dim=dim)
    return full if serial_size is None else full.narrow(dim, 0, serial_size)


def _fresh_module(mod: nn.Module, new_tensor: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A shallow copy of a leaf module with its own parameters and buffers."""
    m = copy.copy(mod)
    for k, v in vars(mod).items():  # hooks and sets of its own: nothing leaks back or across
        if (
            isinstance(v, (dict, set))
            and k.startswith("_")
            and k not in ("_parameters", "_buffers", "_modules")
        ):
            m.__dict__[k] = copy.copy(v)
    m._parameters = {k: None if p is None else cast(nn.Parameter, new_tensor(p))  # of a Parameter
                     for k, p in mod._parameters.items()}  # fmt: skip
    m._buffers = {k: None if b is None else new_tensor(b) for k, b in mod._buffers.items()}
    m._modules = {k: None if s is None else _fresh_module(s, new_tensor)
                  for k, s in mod._modules.items()}  # fmt: skip
    return m


def _unknown_constant(t: Any, names_of: dict[int, list[str]], device: Any) -> bool:
    """A constant of the graph (no tensor of the model) traced on meta, for a module that
    runs on a real device: its value was never computed."""
    real = device is not None and torch.device(device).type != "meta"
    return isinstance(t, torch.Tensor) and t.is_meta and id(t) not in names_of and real


def _install(root: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)


def _grad_mode_back(module: nn.Module, args: Any, output: Any) -> None:
    """After a rank module's call that raised (`output` is None: a refusal at run time),
    grad mode back on: raised inside a no_grad region of the model (its switch off and on
    are graph nodes), it would stay off for the whole process. On is what the graph's
    own code sets after such a region."""
    if output is None:
        torch._C._set_grad_enabled(True)


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `model.state_dict(keep_vars=True)` holds (every name of a tied tensor), read
    without running its hooks: a region builds its graphs inside the model's forward,
    where FSDP's state_dict hook would put its sharded parameters back."""
    out: dict[str, torch.Tensor] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, p in m._parameters.items():
            if p is not None:
                out[prefix + name] = p
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[prefix + name] = b
    return out


@dataclass(frozen=True, kw_only=True)
class RankOptions:
    """How `build_rank_module` builds a rank's module, beyond the plan and the rank.

    seed: the dropout streams' seed (rank 0's, shared by the group), unless `random`
        gives the streams themselves.
    local: tensors, by name, that already are this rank's (shards shared by several
        graphs of one region): used as they are.
    weights: tensors the files hold are read from them, each rank its own slices.
    init: a model on the meta device without weights has each tensor filled whole by
        `init(name, tensor)` (e.g. its `init_parameter`) and cut, one at a time.
    device: where the rank runs (default: the model's; the CPU for a model on the meta
        device): tensors a graph traced on meta (or on `traced_on`) creates are created
        there instead.
    class_name: the module's class name (default: the plan's model name).
    """

    seed: int = 0
    local: dict[str, torch.Tensor] | None = None
    weights: Weights | None = None
    device: torch.device | None = None
    random: RankRandom | None = None
    init: Callable[[str, torch.Tensor], None] | None = None
    traced_on: torch.device | None = None
    class_name: str | None = None


def build_rank_module(
    model: nn.Module, plan: Plan, rank: int, comm: Comm, options: RankOptions = RankOptions()
) -> fx.GraphModule:
    """The module rank `rank` runs: `plan`'s per-rank graph over this rank's shards of
    `model`'s tensors (`model` is the one planned, or one built the same way: the graph's
    modules and attributes are looked up in the plan's traced module, which shares its
    tensors or those of the instance planned)."""
    source, graph, splits, tp = plan.traced.gm, plan.graph, plan.splits, plan.tp
    seed, local, weights, random, init = (options.seed, options.local, options.weights,
                                          options.random, options.init)  # fmt: skip
    class_name = options.class_name or plan.model_name
    device = options.device or _device_of(model)
    graph = _created_on(graph, device, options.traced_on)
    given = local or {}
    # the tensors to cut, by name: `model`'s own, also when the plan's graph module shares
    # the tensors of another instance it was planned on (a plan made on the meta device)
    own = {**dict(model.named_parameters(remove_duplicate=False)),
           **dict(model.named_buffers(remove_duplicate=False))}  # fmt: skip
    serial = {**own, **dict(source.named_parameters(remove_duplicate=False)),
              **dict(source.named_buffers(remove_duplicate=False))}  # fmt: skip
    names_of: dict[int, list[str]] = {}
    for name, t in serial.items():
        names_of.setdefault(id(t), []).append(name)
    made: dict[int, torch.Tensor] = {}
    splits = dict(splits)
    for names in names_of.values():  # a split tensor is split under every name it has
        specs = {str(splits[n]): splits[n] for n in names if n in splits}
        if len(specs) > 1:
            raise AutoTPError(
                f"the tensor named {names} would be split {sorted(specs)}: a weight shared "
                "between layers split different ways cannot be split; untie it, or keep "
                "one of the layers replicated"
            )
        for n in names if specs else ():
            splits[n] = next(iter(specs.values()))

    def new_tensor(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in made:
            names = names_of.get(key, [])
            mine = next((given[n] for n in names if n in given), None)
            if mine is not None:
                made[key] = mine
                return mine
            spec = next((splits[n] for n in names if n in splits), None)
            src = next((own[n] for n in names if n in own), t)
            fill = init if isinstance(t, nn.Parameter) else None  # buffers are not drawn
            local = rank_shard(src, names or ["a constant of the graph"], spec, rank, tp, weights,
                               fill)  # fmt: skip
            if not names and device is not None and local.device != torch.device(device):
                local = local.to(device)  # a constant traced on the CPU, for this device
            made[key] = (
                nn.Parameter(local, requires_grad=src.requires_grad)
                if isinstance(t, nn.Parameter)
                else local
            )
        return made[key]

    random = random or RankRandom(seed, rank)
    sites: dict[str, Callable[[], nn.Module]] = site_modules(comm)
    for stream, name in DROPOUT_MODULES.items():

        def dropout(s: str = stream) -> nn.Module:
            return StreamDropout(random, s)

        sites[name] = dropout
    root: dict[str, object] = {RANK_BUFFER: torch.tensor(rank, device=device)}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)  # a module path or an attribute's, for these two ops
        if node.op == "call_module" and site_kind(target) in sites:
            root[target] = sites[site_kind(target)]()
        elif node.op == "call_module" and target not in root:
            root[target] = _fresh_module(source.get_submodule(target), new_tensor)
        elif node.op == "get_attr" and target not in root:
            value = _lookup(source, target)
            if isinstance(value, nn.Module):  # a higher-order op's body (export's no_grad)
                root[target] = _fresh_module(value, new_tensor)  # each rank its own
            elif _unknown_constant(value, names_of, device):
                raise node_error(
                    next(iter(node.users), node),
                    "this op reads a tensor the forward makes from a Python value (e.g. "
                    "torch.tensor(finfo.min, device=x.device)); autotp traced it on the meta "
                    "device, where that value is lost",
                    "plan a model built with real tensors (weights= then replaces them), "
                    "or report it",
                )
            else:
                root[target] = new_tensor(value) if isinstance(value, torch.Tensor) else value
    gm = fx.GraphModule(root, graph, class_name)
    # Everything else the serial state_dict holds, so full_state_dict has every key, and
    # nothing it does not hold (fx registers every get_attr tensor as a persistent buffer).
    serial_state = _state_tensors(model)  # inside a forward: no state_dict hooks (FSDP's)
    have = set(_state_tensors(gm))
    for name, t in serial_state.items():
        if name not in have:
            _install(gm, name, new_tensor(t))
    for name, _ in gm.named_buffers(remove_duplicate=False):
        if name not in serial_state:
            owner, _, leaf = name.rpartition(".")
            gm.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    gm.get_submodule("")._non_persistent_buffers_set.add(RANK_BUFFER)
    _copy_modes(model, gm)
    modes = tuple(m.training for m in gm.modules())
    gm.__dict__["autotp"] = RankInfo(rank, tp, comm, dict(splits), plan, random, modes)  # rank_info
    gm.register_forward_pre_hook(lambda mod, args: check_mode(mod))
    count_norms(gm, comm, rank, splits)
    gm.register_forward_hook(_grad_mode_back, always_call=True)
    if isinstance(comm, ProcessGroupComm) and comm.size > 1:  # DCP sees this rank's chunks
        shard_states(gm, splits, {n: own[n].shape for n in splits if n in own}, rank, tp)
    if isinstance(comm, ProcessGroupComm) and any(
        n.op == "call_module" and site_kind(n.target) == SP_GATHER_MODULE for n in graph.nodes
    ):
        _keep_sequence_parts(gm)
    return gm


def _keep_sequence_parts(gm: fx.GraphModule) -> None:
    """The forward runs in `keep_parts()`: what the column-split linears save of an
    all-gathered sequence is the rank's part, gathered again in backward, as Megatron-LM
    does."""
    active: list[contextlib.ExitStack] = []

    def enter(mod: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # traced without it (see keep_parts)
            return
        stack = contextlib.ExitStack()
        stack.enter_context(keep_parts())
        active.append(stack)

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        if active and not torch.compiler.is_compiling():
            active.pop().close()

    gm.register_forward_pre_hook(enter)
    gm.register_forward_hook(leave, always_call=True)


def _copy_modes(model: nn.Module, gm: fx.GraphModule) -> None:
    """Every module's train/eval flag as the user set it on the same path of `model` (an
    eval-mode encoder inside a train-mode wrapper stays in eval); a dropout site takes the
    flag of the dropout module it replaces."""
    serial = dict(model.named_modules())
    for path, mod in gm.named_modules():
        mod.training = serial[path].training if path in serial else model.training
    for n in gm.graph.nodes:
        owner = record(n).dropout_of if n.op == "call_module" else None
        if owner is not None and owner in serial:
            gm.get_submodule(str(n.target)).training = serial[owner].training


def _created_on(
    graph: fx.Graph, device: torch.device, traced_on: torch.device | None = None
) -> fx.Graph:
    """`graph`, or a copy whose ops that create or move tensors onto the meta device, or
    onto `traced_on` (torch.export writes the device it traced on into `arange`, `full`,
    `to`), use `device` instead."""
    device = torch.device(device)
    swapped = {torch.device("meta"), *([torch.device(traced_on)] if traced_on else [])}
    swapped.discard(device)

    def on_meta(n: fx.Node) -> bool:
        return any(
            a in swapped for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)
        )

    if not swapped or not any(on_meta(n) for n in graph.nodes):
        return graph
    out = fx.Graph()
    out._codegen = graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    out.output(out.graph_copy(graph, env))

    def swap(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a in swapped else a

    for n in out.nodes:
        if on_meta(n):
            n.args = tuple(swap(a) for a in n.args)
            n.kwargs = {k: swap(v) for k, v in n.kwargs.items()}
    return out


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors are (a model on the meta device gets its weights read
    onto the CPU)."""
    for t in model.parameters():
        return torch.device("cpu") if t.is_meta else t.device
    return torch.device("cpu")


def _lookup(model: nn.Module, target: str) -> object:
    *path, leaf = target.split(".")
    mod = model.get_submodule(".".join(path)) if path else model
    return getattr(mod, leaf)
