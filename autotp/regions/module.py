"""The parallel region: a module that stands where the model's region stood, as an
instance of the region's own class, and runs a traced graph per call pattern over its
ranks' shards (see `form` for how the patterns are planned, `state` for what a user may
change)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..build.dcp_shards import shard_states
from ..build.materialise import RankOptions, build_rank_module
from ..build.simulate import SimulatedTP
from ..capture.calls import RegionCall, cache_index, call_module, modes, take_apart
from ..common.errors import AutoTPError
from ..common.tensor_names import names_by_tensor, with_every_name
from ..integrations.hf import collecting_inside, is_cache, past_of, self_cache
from ..planning.plan import Plan
from ..rewrite.sites import record
from ..runtime.comm import Comm, ProcessGroupComm
from ..runtime.handover import HandedOver, hand_over, taken_over
from ..runtime.random import RankRandom
from ..sharding import Shard
from .state import TRACED_ON, RegionState, SerialAttributeError, cut_serial_state, twin

__all__ = ["RegionTP"]

_CLASSES: dict[type, type[RegionTP]] = {}  # region class -> its RegionTP subclass


class _Patterns(Protocol):
    """What a parallel region reads of its plans by call pattern (form._Patterns)."""

    tp: int
    sequence: bool
    first: Plan | None

    def plan(
        self, twin: Callable[[], nn.Module], call: RegionCall, seqs: set[int], local: bool,
        state: tuple[Any, ...] = (), handed: tuple[str, ...] = (),
    ) -> tuple[Plan, Shard | None]: ...  # fmt: skip


class RegionTP(nn.Module):
    """A region replaced by its tensor-parallel form. With `parallelize` it is its rank's
    shell: the serial region's modules and attributes over this rank's shards, under the
    serial names; with `simulate` every rank's shell sits in `ranks`. Its forward runs a
    graph per call pattern over those tensors (see `state` for what may change).
    Made by `RegionTP.of`, as an instance of the region's own class too, so that the model's
    Python (isinstance checks, the hooks transformers installs to return hidden states,
    gradient checkpointing's __call__) treats it as the region it replaces."""

    # kept in __dict__ (set by __init__), out of nn.Module's attribute machinery
    _autotp_kind: type
    _autotp_shells: list[nn.Module]
    _autotp_path: str
    _autotp_patterns: _Patterns
    _autotp_comms: list[Comm]
    _autotp_randoms: list[RankRandom]
    _autotp_graphs: dict[int, nn.Module]  # by id of the plan
    _autotp_binding: tuple[Any, ...] | None
    _autotp_shapes: dict[str, torch.Size]
    _autotp_index: int | None

    @classmethod
    def of(cls, serial: nn.Module, *args: Any) -> RegionTP:
        kind = type(serial)
        sub = _CLASSES.get(kind)
        if sub is None:
            made = type(f"Parallel{kind.__name__}", (cls, kind), {"__module__": __name__})
            sub = _CLASSES[kind] = cast("type[RegionTP]", made)
        obj = sub.__new__(sub)
        RegionTP.__init__(obj, serial, *args)
        return obj

    def __init__(
        self, serial: nn.Module, patterns: _Patterns, shells: list[nn.Module],
        comms: list[Comm], randoms: list[RankRandom], path: str, shapes: dict[str, torch.Size],
    ) -> None:  # fmt: skip
        """`shapes`: the serial shape of each of the region's tensors (`tensor_shapes`)."""
        nn.Module.__init__(self)  # not the region class's: its tensors are the shells'
        own = set(self.__dict__)  # what nn.Module.__init__ set: hook dicts, tensors, children
        if len(shells) == 1:  # parallelize: the region is this rank's shell, but its hooks
            own -= {"training", "_parameters", "_buffers", "_modules",
                    "_non_persistent_buffers_set"}  # fmt: skip
        else:  # simulate: the shells in `ranks`; the region takes their plain attributes
            own -= {"training"}
        self.__dict__.update({k: v for k, v in shells[0].__dict__.items() if k not in own})
        if len(shells) == 1:
            shells = [self]
        else:
            self.ranks = nn.ModuleList(shells)
        d = self.__dict__
        d["_autotp_kind"] = type(serial)
        d["_autotp_shells"] = shells
        d["_autotp_path"] = path  # in the model: names its pattern graphs and errors
        d["_autotp_patterns"] = patterns
        d["_autotp_comms"] = comms
        d["_autotp_randoms"] = randoms  # each rank's dropout streams: every region's
        d["_autotp_graphs"] = {}  # per plan, over the tensors of `_autotp_binding`
        d["_autotp_binding"] = None
        d["_autotp_shapes"] = shapes
        d["_autotp_index"] = cache_index(serial)
        # unannotated in torch
        self._register_load_state_dict_pre_hook(self._cut_serial)  # type: ignore[no-untyped-call]
        comm = comms[0]
        if shells[0] is self and isinstance(comm, ProcessGroupComm) and comm.size > 1:
            # DCP sees which chunks of the serial tensors this rank holds
            shard_states(self, self.splits(), self._autotp_shapes, comm.rank, comm.size)

    def __getattr__(self, name: str) -> Any:
        shells = self.__dict__.get("_autotp_shells")
        if shells and shells[0] is not self:  # simulate: every rank holds its own
            first = shells[0]
            if name in first._modules or name in first._parameters or name in first._buffers:
                path = self.__dict__["_autotp_path"]
                raise SerialAttributeError(
                    f"{path}.{name}: in autotp.simulate every rank holds its own copy of it",
                    hint=f"reach rank r's as {path}.ranks[r].{name} (with parallelize, "
                    f"{path}.{name} is the process's own rank's)",
                )
        return super().__getattr__(name)

    def __deepcopy__(self, memo: dict[int, Any]) -> RegionTP:
        """A copy with its own tensors and dropout streams, sharing the plans (which hold
        no values: traced on meta); its graphs are built over its tensors when called."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        shared = {"_autotp_patterns", "_autotp_comms", "_autotp_kind"}
        for k, v in self.__dict__.items():
            if k in shared:
                new.__dict__[k] = v
            elif k not in ("_autotp_graphs", "_autotp_binding"):
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.__dict__["_autotp_graphs"], new.__dict__["_autotp_binding"] = {}, None
        return new

    @property
    def tp(self) -> int:
        return self._autotp_patterns.tp

    @property
    def shells(self) -> list[nn.Module]:
        """The ranks' shells: this region (parallelize), or every rank's (simulate)."""
        return self._autotp_shells

    def splits(self) -> dict[str, Shard]:
        """Split tensors by their name in the region."""
        first = self._autotp_patterns.first
        if first is None:
            return {}
        named = {k.removeprefix("layer."): v for k, v in first.splits.items()}
        # a tensor under two names (BERT's head bias) is split under both
        return with_every_name(named, names_by_tensor(self._autotp_shells[0]).values())

    def _apply(  # .to(), .double()
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> RegionTP:
        self._autotp_graphs.clear()  # rebuilt over the converted tensors
        # torch leaves _apply unannotated (it returns self)
        out: RegionTP = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return out

    def _cut_serial(self, state: dict[str, Any], prefix: str, *rest: Any) -> None:
        ranks = [c.rank for c in self._autotp_comms]
        nested = self._autotp_shells[0] is not self
        cut_serial_state(state, prefix, ranks, self.tp, self.splits(), self._autotp_shapes,
                         nested)  # fmt: skip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and getattr(self, "gradient_checkpointing", False):
            self._prepare(args, kwargs)  # plan before the checkpoint: not inside it
        return super().__call__(*args, **kwargs)

    def _prepare(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Plan, RegionCall, Any]:
        """The plan of this call, made if new, with the call taken apart and its cache."""
        inside = collecting_inside()
        if inside is not None:
            raise AutoTPError(
                f"the model asks for {inside}, which transformers collects from inside each "
                "decoder layer, and a parallel layer runs as one graph",
                hint=f"call the model without output_{inside}=True (hidden states are returned)",
            )
        shells = self._autotp_shells
        state = RegionState(shells, self._autotp_path, self)
        if state.binding != self._autotp_binding:
            self._rebind(state.binding)
        cache = next((v for v in (*args, *kwargs.values()) if is_cache(v)), None)
        past = self._past(cache) if cache is not None else None
        args, kwargs, parts = self._taken_over(args, kwargs)
        call = take_apart(args, kwargs, past, modes(shells[0]))
        handed = tuple(n for n, t in call.tensors.items() if any(t is p for p in parts))
        local = len(shells) == 1
        seqs = {t.shape[1] * (self.tp if local and n in handed else 1)
                for n, t in call.tensors.items() if t.dim() >= 2}  # fmt: skip
        seqs |= {t.shape[-2] for t in (past or ())}
        seqs |= {a + b for a in seqs for b in seqs}
        with torch.no_grad():
            plan, _ = self._autotp_patterns.plan(self._twin, call, seqs, local, state.key,
                                                 handed)  # fmt: skip
        return plan, call, cache

    def _taken_over(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
        """The call with each hidden state the previous layer handed over (HandedOver)
        replaced by the part this region takes: the rank's part under sequence
        parallelism (in simulate, the whole, which each rank's graph cuts), else the
        serial tensor (gathered); and the parts so taken."""
        parts: list[torch.Tensor] = []

        def take(x: Any) -> Any:
            if not isinstance(x, HandedOver):
                return x
            part = taken_over(x)
            if part is None or not self._autotp_patterns.sequence:
                return x.whole()
            parts.append(part)
            return part

        return (tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}, parts)

    def _twin(self) -> nn.Module:
        return twin(self._autotp_shells[0], self._autotp_kind, self._autotp_shapes,
                    self._autotp_path)  # fmt: skip

    def _rebind(self, binding: tuple[Any, ...]) -> None:
        """The region's tensors are other objects than its graphs run over (assigned,
        loaded with assign=True, swapped by functional_call, unfrozen): check their
        shapes and build the graphs over them."""
        built = self.__dict__.get("_autotp_local_shapes")
        if built is not None:
            for r, shell in enumerate(self._autotp_shells):
                for name, t in [*shell.named_parameters(), *shell.named_buffers()]:
                    if name in built and tuple(t.shape) != built[name]:
                        rank = f"rank {r}" if len(self._autotp_shells) > 1 else "this rank"
                        raise AutoTPError(
                            f"{self._autotp_path}.{name} has shape {tuple(t.shape)}, but "
                            f"{rank} holds {built[name]} of it: a parallel region's tensors "
                            "are its rank's shards",
                            hint="load serial weights with "
                            "load_state_dict (autotp cuts them), or set shards of these shapes",
                        )
        else:
            shell = self._autotp_shells[0]
            self.__dict__["_autotp_local_shapes"] = {
                n: tuple(t.shape) for n, t in [*shell.named_parameters(), *shell.named_buffers()]
            }
        self._autotp_graphs.clear()
        self.__dict__["_autotp_binding"] = binding

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan, call, cache = self._prepare(args, kwargs)
        if self.training and getattr(self, "gradient_checkpointing", False) and _drops(plan):
            raise AutoTPError(
                f"gradient checkpointing of a parallel {self._autotp_kind.__name__} would "
                "draw other dropout masks when it recomputes the layer, so its gradients "
                "would be wrong",
                hint="set the model's dropout to 0 for checkpointed "
                "training, or call model.gradient_checkpointing_disable()",
            )
        out = self._runner(plan, call)(**call.tensors)
        if cache is not None:
            out, new_key, new_value = out  # simulate shows them whole: its cache: all heads
            self_cache(cache).update(new_key, new_value, self._autotp_index)
        return self._hand_over(plan, out)

    def _hand_over(self, plan: Plan, out: Any) -> Any:
        """`out` with its hidden state (the first output) as a HandedOver where the plan
        leaves it split along the sequence, for the next layer."""
        leaves = tree_flatten(plan.traced.gm.graph.output_node().args[0])[0]
        if -len(leaves) not in plan.propagation.handed_over:
            return out
        flat, spec = tree_flatten(out)
        local = len(self._autotp_shells) == 1
        size = flat[0].shape[1] * (self.tp if local else 1)
        flat[0] = hand_over(flat[0], 1, size, self._autotp_comms[0] if local else None, self.tp)
        return tree_unflatten(flat, spec)

    def _past(self, cache: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The past keys and values of this layer in the model's cache, or None."""
        index = self._autotp_index
        if index is None:
            raise AutoTPError(
                f"{self._autotp_kind.__name__} has no layer_idx, so autotp cannot tell which "
                "of the cache's layers is its own",
                hint="call the model with use_cache=False",
            )
        return past_of(cache, index, self._autotp_kind.__name__)

    def _class_name(self, rank: int) -> str:
        """The class of a pattern's graph module: the region's class, its path and (when
        simulated) its rank. Unique per graph that runs, as PyTorch's module tracker
        (CommDebugMode's) needs of modules that are not children of the model: it names
        them by their class, and leaks the hooks of two it names alike."""
        path = self._autotp_path.replace(".", "_")
        rank_part = f"_rank{rank}" if len(self._autotp_shells) > 1 else ""
        return f"{self._autotp_kind.__name__}_{path}{rank_part}"

    def _runner(self, plan: Plan, call: RegionCall) -> nn.Module:
        graphs = self._autotp_graphs
        key = id(plan)
        if key not in graphs:
            ranks = []
            for shell, comm, random in zip(self._autotp_shells, self._autotp_comms,
                                           self._autotp_randoms, strict=True):  # fmt: skip
                module = call_module(shell, call)  # names its tensors as the plan's graph
                local = {f"layer.{n}": t for n, t in [
                    *shell.named_parameters(remove_duplicate=False),
                    *shell.named_buffers(remove_duplicate=False)]}  # fmt: skip
                options = RankOptions(
                    seed=random.seed,
                    local=local,
                    random=random,
                    traced_on=TRACED_ON,
                    device=next(iter(local.values())).device if local else None,
                    class_name=self._class_name(comm.rank),
                )
                ranks.append(build_rank_module(module, plan, comm.rank, comm, options))
            graphs[key] = ranks[0] if len(ranks) == 1 else SimulatedTP(ranks)
        return graphs[key]


def _drops(p: Plan) -> bool:
    """Whether the plan's graph draws dropout masks (a site whose probability is not 0)."""
    for n in p.graph.nodes:
        if n.op == "call_module" and record(n).dropout is not None:
            prob = n.args[1] if len(n.args) > 1 else n.kwargs.get("p")
            if prob != 0.0:
                return True
    return False
