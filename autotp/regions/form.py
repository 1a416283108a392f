"""The region form: a model that keeps its own Python, with each of its regions (a
transformers model's decoder layers, and its input embedding and output head, split
along the vocabulary: see integrations.hf.vocab_regions) replaced by its tensor-parallel
form. `plan_regions` makes the RegionPlan (planning.region_plan), `build_regions` the module.

`parallelize` and `simulate` use it for Hugging Face models: everything around the regions
(position tables, masks, the cache, the loss, the output type, `generate()`) stays the
model's own code, replicated, so the parallel model takes every keyword the serial one
takes and returns what it returns. Inside a region everything is as in the graph form:
traced, matched, proven, rewritten.

A region is called in several ways: with or without a cache, with a mask or none, one new
token or a prompt. Each way (a *call pattern*: which arguments are given, their constant
values, and the sizes torch.export could not keep dynamic, such as a single token) is
traced with torch.export once, batch and sequence dynamic, and planned: the first pattern
of a region with rule matching, the later ones with the first's splits, proven again on
their own graph. All patterns of a region share one set of shards; regions that are one
program (the same structure, the same ops with the same numbers, the same hooks) share
their plans. A pattern's graph holds for the sizes export allowed (`exported.accepts`);
a call outside them is a new pattern.

The cache (transformers' DynamicCache) stays outside the graph: a pattern with a past
takes the past keys and values as inputs (each rank's own heads, the placement the layer's
keys have) and returns the new ones as outputs, which the layer appends to the model's
cache with its own `update`. So each rank's cache holds its own heads only. An
encoder-decoder's EncoderDecoderCache keeps its self-attention half so; its cross-attention
half stays empty, and the encoder's keys are recomputed at each step.

A module that wraps a transformers model (a SentenceTransformer) is made parallel the same
way: the regions are its transformers model's. The parallel region itself, and what a user
may change of it, are in module.py and state.py.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..build.weights import Weights
from ..capture.calls import (
    PAST,
    RegionCall,
    cache_index,
    call_module,
    dynamic_sizes,
    modes,
    take_apart,
)
from ..capture.exported import accepts
from ..capture.trace import _dispatched
from ..common.errors import AutoTPError, first_line
from ..common.hooks import HOOK_DICTS, HOOK_FLAGS, HOOKS, hooks_of
from ..common.tensor_names import names_by_tensor
from ..common.tools import tools_aside
from ..integrations.hf import (
    VocabRegions,
    drop_collectors,
    eager_masks,
    gathering_save,
    is_cache,
    is_region_model,
    transformers_model,
    vocab_regions,
)
from ..integrations.hf import (
    collects as _collects,
)
from ..match.rule import Rule
from ..planning import cache as plan_cache
from ..planning.plan import Plan, _plan, model_signature
from ..planning.region_plan import Region, RegionKind, RegionPlan
from ..runtime.comm import Comm
from ..runtime.random import RankRandom
from ..sharding import Shard, VocabOptions
from .module import RegionTP
from .state import RegionState, _unfilled, tensor_shapes, twin
from .tensors import full_tensors, load_outside, shell

__all__ = ["find_layers", "is_region_model", "RegionTP", "plan_regions", "build_regions"]


def find_layers(model: nn.Module) -> list[str]:
    """Paths of the repeated layers: the children of each outermost nn.ModuleList whose
    children are of one class and hold weight matrices (decoder and encoder layers)."""
    lists: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in lists) or not isinstance(mod, nn.ModuleList):
            continue
        kinds = {type(c) for c in mod}
        if len(mod) and len(kinds) == 1 and sum(p.dim() >= 2 for p in mod[0].parameters()) >= 2:
            lists.append(name)
    return [f"{lst}.{i}" for lst in lists
            for i in range(len(cast(nn.ModuleList, model.get_submodule(lst))))]  # fmt: skip


def _program(region: nn.Module, call: RegionCall) -> tuple[Any, ...]:
    """What makes two regions one program, so that they share plans: their structure, the
    ops they dispatch on `call` (run on fake tensors) with every number those ops take
    (a layer index that scales a value shows there), and their hooks; a region whose ops
    cannot be listed shares with none."""
    ops: tuple[str | int, ...]
    try:
        ops = tuple(_dispatched(call_module(region, call), call.tensors))
    except Exception:  # noqa: BLE001 - its Python reads values: plan it on its own
        ops = (id(region),)
    hooks = tuple(
        (path, attr, len(getattr(m, attr)))
        for path, m in region.named_modules()
        for attr in dict.fromkeys(a for a, _, _ in hooks_of(m, _collects))
    )
    return _structure(region), ops, hooks


def _structure(region: nn.Module) -> tuple[Any, ...]:
    """Classes, tensor shapes and dtypes, and the plain attributes the regions' Python
    reads (a layer index aside: `_program` sees where it changes a computation)."""
    out = []
    for path, m in region.named_modules():
        attrs = []
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") or k in ("training", "layer_idx"):
                continue
            simple = isinstance(v, (int, float, str, bool, type(None), tuple))
            attrs.append((k, repr(v) if simple else id(v)))
        tensors = [(k, tuple(t.shape), t.dtype) for k, t in
                   [*m._parameters.items(), *m._buffers.items()] if t is not None]  # fmt: skip
        out.append((path, type(m), tuple(attrs), tuple(tensors), m.training))
    return tuple(out)


_UNKNOWN = object()


class _Patterns:
    """The plans of one region structure, by call pattern, shared by its regions."""

    def __init__(
        self, tp: int, rules: tuple[Rule, ...], strict: bool, tables: frozenset[str] = frozenset(),
        sequence: bool = False,
    ) -> None:  # fmt: skip
        self.tp, self.rules, self.strict, self.tables = tp, rules, strict, tables
        self.sequence = sequence  # sequence parallelism inside the region
        self.first: Plan | None = None
        self.plans: dict[tuple[Any, ...], list[tuple[Plan, Shard | None]]] = {}
        self.seen: dict[tuple[Any, ...], tuple[Plan, Shard | None]] = {}  # exact sizes -> plan
        self.kv: Any = _UNKNOWN  # how the new keys are placed, once a cached call showed it

    @property
    def shown(self) -> Plan:
        """The plan a prompt runs: the first planned with the hidden state handed over
        (sequence parallelism), else the first."""
        handed = next((made for key, made in self.plans.items() if key[-1]), None)
        if handed:
            return handed[0][0]
        # a region is made once plan_regions planned its model's call, which has no past
        assert self.first is not None
        return self.first

    def plan(
        self, twin: Callable[[], nn.Module], call: RegionCall, seqs: set[int], local: bool,
        state: tuple[Any, ...] = (), handed: tuple[str, ...] = (),
    ) -> tuple[Plan, Shard | None]:  # fmt: skip
        """The plan for `call` and how its keys are placed, traced (when no plan of the
        region's `state` accepts the call) from `twin()`: the region as it now is, on meta.
        `local`: the call's past is this rank's own (parallelize), not the whole
        (simulate). `handed`: inputs the previous layer handed over split along the
        sequence (this rank's part, when `local`)."""
        key = (*call.key, state, handed)
        sizes = (key, local, tuple((n, tuple(t.shape)) for n, t in call.tensors.items()))
        if sizes in self.seen:  # these very sizes were accepted before
            return self.seen[sizes]
        for p, kv in self.plans.get(key, []):
            if accepts(p.traced.gm, self._serial(call.tensors, kv, local, handed)):
                self.seen[sizes] = (p, kv)
                return p, kv
        region = twin()
        for m, flag in zip(region.modules(), call.key[-1], strict=True):
            m.training = flag  # traced in the modes the call holds
        with tools_aside():  # CommDebugMode's or a profiler's hooks are not the region's
            made = self._plan(region, call, seqs, local, handed)
        self.plans.setdefault(key, []).append(made)
        self.seen[sizes] = made
        plan_cache.grew(self)  # a stored plan keeps its new pattern
        return made

    def _serial(
        self, tensors: dict[str, torch.Tensor], kv: Any, local: bool, handed: tuple[str, ...]
    ) -> dict[str, Any]:  # fmt: skip
        """The call's inputs as the serial region would get them (a local past, a local
        part of the sequence widened), as unfilled CPU tensors (see state.twin):
        planning reads no values."""
        out: dict[str, Any] = {n: _unfilled(t.shape, t.dtype) for n, t in tensors.items()}
        widen = {n: (kv.dim, kv.slices(self.tp)) for n in PAST if isinstance(kv, Shard)}
        widen.update(dict.fromkeys(handed, (1, self.tp)))
        if local and self.tp > 1:
            for n, (dim, ways) in widen.items():
                if n in tensors:
                    size = list(tensors[n].shape)
                    size[dim] *= ways
                    out[n] = _unfilled(size, tensors[n].dtype)
        return out

    def _plan(
        self, region: nn.Module, call: RegionCall, seqs: set[int], local: bool,
        handed: tuple[str, ...],
    ) -> tuple[Plan, Shard | None]:  # fmt: skip
        batch = next(iter(call.tensors.values())).shape[0]
        module = call_module(region, call)
        # the new keys and values stay each rank's own (its cache); anything else split
        # that the layer returns (attention weights) is gathered, as the graph form does;
        # with sequence parallelism the hidden state (the first output) is handed over to
        # the next layer split along the sequence, and one handed over is taken as it is
        opts = VocabOptions(
            local_outputs=(-2, -1) if call.cache_at is not None else (),
            sequence_inputs=handed, hand_over=(0,) if self.sequence else (),
        )  # fmt: skip
        common: dict[str, Any] = dict(
            dims=dynamic_sizes(call, batch, seqs), like=self.first, tables=self.tables,
            sequence_parallel=self.sequence,
        )  # fmt: skip
        if call.key[3]:  # a past: given as the keys are placed
            if self.kv is _UNKNOWN and local and self.tp > 1:
                raise AutoTPError(
                    "the model's first cached call to a parallel layer came with a past "
                    "already in its cache: each rank's cache must hold its own heads",
                    hint="start generation from an empty cache (generate() does)",
                )
            errors = []
            for kv in (Shard(1), None) if self.kv is _UNKNOWN else (self.kv,):
                inputs = dict.fromkeys(PAST, kv) if kv is not None else None
                tensors = self._serial(call.tensors, kv, local, handed)
                try:
                    p = _plan(module, self.tp, tensors, self.rules, opts, "export", True,
                              inputs=inputs, **common)  # fmt: skip
                except AutoTPError as e:
                    errors.append(e)
                    continue
                if _new_keys_placement(p) == kv:
                    _check_index(region, module)
                    self._check(p)
                    self.kv = kv
                    return p, kv
            raise (
                errors[0]
                if errors
                else AutoTPError(
                    f"{type(region).__name__}: its new keys and values are not placed as its "
                    "past ones can be given (split by heads, or whole)"
                )
            )
        tensors = self._serial(call.tensors, None, local, handed)
        p = _plan(module, self.tp, tensors, self.rules, opts, "export", self.strict, **common)
        _check_index(region, module)
        self._check(p)
        if self.first is None:
            self.first = p
        if call.cache_at is None:
            return p, None
        self.kv = _new_keys_placement(p)
        return p, self.kv

    def _check(self, p: Plan) -> None:
        """Refuse a plan whose graph reads a tensor split otherwise than the region's shards
        are."""
        gm = p.traced.gm
        if self.first is not None:
            for n in gm.graph.nodes:
                name = str(n.target)
                if n.op == "get_attr" and str(p.splits.get(name)) != str(
                    self.first.splits.get(name)
                ):
                    raise AutoTPError(
                        f"{name} is split {self.first.splits.get(name) or 'not at all'} in the "
                        f"region's first plan but {p.splits.get(name) or 'not'} in this call's",
                        hint="call the model as it was first called, or report it",
                    )


def _check_index(layer: nn.Module, traced: nn.Module) -> None:
    """The index the layer gave its cache while traced must be the one found for it."""
    given = traced.__dict__.get("index")
    if given is not None and given != cache_index(layer):
        raise AutoTPError(
            f"{type(layer).__name__} updates the cache's layer {given!r}, but its layer index "
            f"reads {cache_index(layer)!r}",
            hint="call the model with use_cache=False",
        )


def _new_keys_placement(p: Plan) -> Shard | None:
    """The placement of a cached pattern's returned new keys and values (equal, or refused)."""
    out = p.traced.gm.graph.output_node()
    leaves = tree_flatten(out.args[0])[0][-2:]
    found = {str(p.propagation.gathers.get(n, (None,))[0]) for n in leaves}
    if len(found) != 1:
        raise AutoTPError("the layer's new keys and values are placed differently")
    return p.propagation.gathers.get(leaves[0], (None, 0))[0]


def _run_once(model: nn.Module, inputs: dict[str, Any], paths: list[str]) -> None:
    """Run the model once so that its layers (at `paths`) show how it calls them: really
    where it has weights (no grad; a small batch), else (on the meta device, where the
    model's Python cannot read a value) under torch.export, which the model's Python
    recognises as tracing and whose fake tensors the hooks see. Traced, only the first
    layer of each list runs its own forward; the others return what it returned (one
    class, one output structure), so the trace holds one layer, not all, while the
    model's Python still calls each layer as it would. Where that fails, all run."""
    if not any(t.is_meta for t in model.parameters()):
        with torch.no_grad():
            model(**inputs)
        return
    with eager_masks():
        try:
            with _first_layer_only(model, paths):
                torch.export.export(_Ran(model), (), inputs, strict=False)
            return
        except Exception:  # noqa: BLE001 - every layer runs its own forward below
            pass
        try:
            torch.export.export(_Ran(model), (), inputs, strict=False)
        except Exception as e:  # noqa: BLE001 - becomes an actionable error
            raise AutoTPError(
                f"running {type(model).__name__} on the meta device failed: "
                f"{type(e).__name__}: {first_line(e)}",
                hint="build the model with real tensors (its weights are then replaced by "
                "weights=), or pass example_inputs= it takes",
            ) from e


class _Ran(nn.Module):
    """The model, run for its calls only: it returns nothing (its outputs may hold objects
    torch.export cannot return, such as a transformers cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> tuple[()]:
        self.model(**inputs)
        return ()


@contextlib.contextmanager
def _first_layer_only(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """Every layer but the first of its list returns the first one's output."""
    lists: dict[str, list[nn.Module]] = {}
    for p in paths:
        lists.setdefault(p.rpartition(".")[0], []).append(model.get_submodule(p))
    outputs: dict[str, Any] = {}
    handles, stubbed = [], []
    for name, layers in lists.items():
        handles.append(layers[0].register_forward_hook(
            lambda m, a, out, name=name: outputs.setdefault(name, out)))  # fmt: skip
        for b in layers[1:]:
            b.__dict__["forward"] = lambda *a, name=name, **k: outputs[name]
            stubbed.append(b)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for b in stubbed:
            del b.__dict__["forward"]


def _zeros_like_fake(x: Any) -> Any:
    """A captured tensor (real, or export's fake one) as zeros of its shape, dtype and
    device: tracing reads no values, and nothing of the run is kept."""
    if isinstance(x, torch.Tensor):
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return x


def plan_regions(
    model: nn.Module,
    tp: int,
    example_inputs: Any,
    rules: tuple[Rule, ...],
    strict: bool,
    sequence_parallel: bool = False,
) -> RegionPlan:
    """The regions of `model` (its repeated layers, and its input embedding and output
    head, split along the vocabulary) and their plans, from one run of the model that
    shows how it calls each (on the meta device, traced). Reads no values."""
    from ..capture.trace import bind_inputs

    paths = find_layers(model)
    if not paths:
        raise AutoTPError(
            f"{type(model).__name__} has no repeated layers (an nn.ModuleList of them) "
            "to parallelize one by one",
            hint="pass example_inputs to plan the whole model",
        )
    vocab = vocab_regions(model, paths)
    inner_path, inner = transformers_model(model) or ("", model)
    # a wrapper (a SentenceTransformer) without example inputs: its transformers model is
    # run on inputs made from its config, which shows how the regions are called
    runner = model if inner is model or example_inputs is not None else inner
    prefix = inner_path + "." if runner is inner and inner_path else ""
    inputs = bind_inputs(runner, example_inputs)
    key = plan_cache.program_key(model, tp, inputs, rules, strict, sequence_parallel)
    stored = plan_cache.load(key, rules)
    if stored is not None:
        return stored
    calls, handed = _calls(model, runner, inputs, paths, vocab.regions, prefix)
    vocab = _called(vocab, calls, model)
    kinds: dict[str | None, RegionKind] = {**dict.fromkeys(vocab.embeddings, "embedding"),
                                            vocab.head: "head"}  # fmt: skip
    by_structure: dict[tuple[Any, ...], _Patterns] = {}
    regions = []
    for path in [*paths, *vocab.regions]:
        if path not in calls:
            if path in vocab.embeddings:  # a holder of the table the model never calls
                continue
            raise AutoTPError(f"the model did not call its region {path} on the example inputs")
        module = model.get_submodule(path)
        a, k = calls[path]
        call = take_apart(a, k, None, modes(module))
        tables = vocab.tables.get(path, frozenset())
        sequence = sequence_parallel and path != vocab.head  # the embedding hands over too
        patterns = by_structure.setdefault(
            (_program(module, call), tables, sequence),
            _Patterns(tp, rules, strict, tables, sequence),
        )
        seqs = {t.shape[1] for t in call.tensors.values() if t.dim() >= 2}
        shapes = tensor_shapes(module)
        made = lambda m=module, s=shapes, p=path: twin(m, type(m), s, p)  # noqa: E731
        state = RegionState([module], path, module).key
        with torch.no_grad():
            patterns.plan(made, call, seqs, local=False, state=state)
            if sequence and path not in kinds and handed.get(path):
                # the pattern its calls take with the hidden state handed over, planned
                # now so that the plan shows it (a one-token decode takes the first)
                patterns.plan(made, call, seqs, local=False, state=state, handed=handed[path])
        regions.append(Region(path, kinds.get(path, "layer"), type(module), patterns, shapes,
                              _aliases(module)))  # fmt: skip
    for path in vocab.embeddings:  # planned like a called holder of one structure
        if path not in calls:
            module = model.get_submodule(path)
            like = next(r for r in regions if r.kind == "embedding" and
                        _structure(model.get_submodule(r.path)) == _structure(module))  # fmt: skip
            regions.append(Region(path, "embedding", type(module), like.patterns,
                                  tensor_shapes(module), _aliases(module)))  # fmt: skip
    planned = RegionPlan(type(model).__name__, tp, tuple(regions), vocab, model_signature(model),
                         sequence_parallel)  # fmt: skip
    plan_cache.store(key, planned)
    return planned


def _called(vocab: VocabRegions, calls: dict[str, _Call], model: nn.Module) -> VocabRegions:
    """`vocab` if the example call used it: its head, and an embedding holding the table
    of each structure among them (another holder is then planned like it, and plans its
    own call if the model ever makes one); else nothing split along the vocabulary."""
    if vocab.head is not None and vocab.head not in calls:
        return VocabRegions((), None, {}, "the example call did not use the output head")
    shapes = {_structure(model.get_submodule(p)) for p in vocab.embeddings}
    used = {_structure(model.get_submodule(p)) for p in vocab.embeddings if p in calls}
    if vocab.embeddings and shapes != used:  # inputs_embeds given, or a holder unlike them
        return VocabRegions((), None, {}, "the example call did not use the input embedding")
    return vocab


def _aliases(region: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The names of each tensor of `region` that has several."""
    return tuple(tuple(v) for v in names_by_tensor(region).values() if len(v) > 1)


def build_regions(
    model: nn.Module, plan: RegionPlan, comms: list[Comm], seed: int,
    weights: Weights | None = None,
) -> nn.Module:  # fmt: skip
    """A copy of `model` with every region of `plan` replaced by a RegionTP holding the
    shards of the ranks of `comms` (one for `parallelize`, every rank for `simulate`).
    With `weights`, every tensor comes from there, each rank reading its slices (`model`
    may be on the meta device); else from `model`."""
    plan.check_fits(model)
    tp = plan.tp
    inner_path, _ = transformers_model(model) or ("", model)
    modules = {r.path: model.get_submodule(r.path) for r in plan.regions}
    memo: dict[int, Any] = {id(m): None for m in modules.values()}
    hooks = {p: _carry_hooks(m, memo) for p, m in modules.items()}
    copied = copy.deepcopy(model, memo)  # everything but the regions: those are replaced
    drop_collectors(copied)
    if weights is not None:
        load_outside(copied, model, weights, tuple(p + "." for p in modules))
    names_of = names_by_tensor(model)  # every name of a tensor: a file may hold any
    # per rank: a tensor two regions hold is one
    shared: list[dict[int, tuple[Shard | None, torch.Tensor]]] = [{} for _ in comms]
    randoms = [RankRandom(seed, c.rank) for c in comms]  # one stream set per rank, shared
    for region in plan.regions:
        path, module = region.path, modules[region.path]
        shells = [shell(module, region.splits, c.rank, tp, weights, path, shared[i], names_of)
                  for i, c in enumerate(comms)]  # fmt: skip
        for s in shells:  # the layers read the parallel model's config, not the user's
            drop_collectors(s)
            s.__dict__.update({a: type(getattr(s, a))() for a in HOOK_DICTS})  # the region's
            _repoint(s, memo)
        parallel = RegionTP.of(module, region.patterns, shells, comms, randoms, path,
                              region.shapes)  # fmt: skip
        parallel.__dict__.update(hooks[path])
        parent, _, leaf = path.rpartition(".")
        (copied.get_submodule(parent) if parent else copied)._modules[leaf] = parallel
    # the region form's own attributes of the model (plain values, not tensors or modules)
    copied.autotp_regions = tuple(modules)  # type: ignore[assignment]
    copied.autotp_plan = plan  # type: ignore[assignment]
    saver = copied.get_submodule(inner_path)  # the serial checkpoint, gathered
    if inner_path:  # what a wrapper saves through its transformers model
        saver.autotp_regions = tuple(p.removeprefix(inner_path + ".") for p in modules)  # type: ignore[assignment]
    gathering_save(saver, lambda m: full_tensors(m, grads=False), comms[0].rank)
    return copied


def _carry_hooks(region: nn.Module, memo: dict[int, Any]) -> dict[str, Any]:
    """The forward and backward hooks on `region` itself (not those transformers installs
    to collect outputs, which it installs again), for its parallel region: it takes the
    same inputs and returns the same outputs. Handles stored in the model (copied with
    it) remove them from the parallel region (`memo` maps each dict to its copy); a
    handle the user holds acts on the user's model only."""
    out: dict[str, Any] = {}
    for attr in HOOK_DICTS:
        given = getattr(region, attr)
        keep = type(given)(
            (k, v) for k, v in given.items() if attr not in HOOKS or not _collects(v)
        )
        memo[id(given)] = out[attr] = keep
    for attr in HOOK_FLAGS:
        if attr in region.__dict__:
            out[attr] = region.__dict__[attr]
    return out


_Call = tuple[tuple[Any, ...], dict[str, Any]]  # a call's positional and keyword arguments


def _calls(
    model: nn.Module, runner: nn.Module, inputs: dict[str, Any], layers: list[str],
    vocab: tuple[str, ...], prefix: str,
) -> tuple[dict[str, _Call], dict[str, tuple[str, ...]]]:  # fmt: skip
    """How the model calls each of its regions (the layers at `layers`, the vocabulary's
    at `vocab`), from one run of `runner` on `inputs`; captured tensors as zeros. And,
    for each region, its call's inputs (by RegionCall name) that are a layer's or an input
    embedding's first output as it returned it: what sequence parallelism hands over,
    where the model's Python only passes it on."""
    calls: dict[str, _Call] = {}
    handed: dict[str, tuple[str, ...]] = {}
    returned: list[torch.Tensor] = []  # held, so that no id is reused meanwhile

    def before(p: str, a: tuple[Any, ...], k: dict[str, Any]) -> None:
        if p in calls:
            return
        calls[p] = (a, k)
        leaves = tree_flatten(_without_cache(a, k))[0]
        handed[p] = tuple(f"in{i}" for i, leaf in enumerate(leaves)
                          if isinstance(leaf, torch.Tensor)
                          and any(leaf is r for r in returned))  # fmt: skip

    def after(out: Any) -> None:
        first = next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), None)
        if first is not None:
            returned.append(first)

    hooks = []
    for p in [*layers, *vocab]:
        m = model.get_submodule(p)
        hooks.append(m.register_forward_pre_hook(lambda m, a, k, p=p: before(p, a, k),
                                                 with_kwargs=True))  # fmt: skip
        hooks.append(m.register_forward_hook(lambda m, a, out: after(out)))
    try:
        _run_once(runner, inputs, [p.removeprefix(prefix) for p in layers])
    finally:
        for h in hooks:
            h.remove()
    return {p: tree_map(_zeros_like_fake, c) for p, c in calls.items()}, handed


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    """A call's arguments with its cache left out, as `take_apart` names the rest."""
    return (tuple(None if is_cache(a) else a for a in args),
            {k: None if is_cache(v) else v for k, v in kwargs.items()})  # fmt: skip


def _repoint(shell: nn.Module, memo: dict[int, Any]) -> None:
    """Point the shell's plain attributes that the model's copy copied (its config) at
    the copy's, so that what a user sets on the parallel model (its attention
    implementation) reaches its layers, and what they set on their own model does not."""
    for m in shell.modules():
        for k, v in list(m.__dict__.items()):
            if not isinstance(v, (nn.Module, torch.Tensor)) and memo.get(id(v)) is not None:
                m.__dict__[k] = memo[id(v)]
