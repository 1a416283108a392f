"""The block form: a model that keeps its own Python, with each repeated block (a
transformers model's decoder layers) replaced by its tensor-parallel form.

`parallelize` and `simulate` use it for Hugging Face models: everything around the blocks
(embeddings, masks, the cache, the loss, the output type, `generate()`) stays the model's
own code, replicated, so the parallel model takes every keyword the serial one takes and
returns what it returns. Inside a block everything is as in the graph form: traced,
matched, proven, rewritten.

A block is called in several ways: with or without a cache, with a mask or none, one new
token or a prompt. Each way (a *call pattern*: which arguments are given, their constant
values, and the sizes torch.export could not keep dynamic, such as a single token) is
traced with torch.export once, batch and sequence dynamic, and planned: the first pattern
of a block with rule matching, the later ones with the first's splits, proven again on
their own graph. All patterns of a block share one set of shards; blocks of one structure
share their plans. A pattern's graph holds for the sizes export allowed (`trace.accepts`);
a call outside them is a new pattern.

The cache (transformers' DynamicCache) stays outside the graph: a pattern with a past
takes the past keys and values as inputs (each rank's own heads, the placement the block's
keys have) and returns the new ones as outputs, which the block appends to the model's
cache with its own `update`. So each rank's cache holds its own heads only.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .collectives import Comm
from .errors import AutoTPError
from .materialise import _fresh_module, build_rank_module, cut, gather
from .plan import Plan, _plan
from .rule import Rule
from .sharding import Shard, VocabOptions
from .simulate import SimulatedTP
from .trace import accepts
from .weights import Weights, fill_buffers

__all__ = ["find_blocks", "is_block_model", "BlockTP", "parallel_blocks"]

_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")  # update = cat along seq
_PAST = ("past_key", "past_value")


def is_block_model(model: nn.Module) -> bool:
    """A transformers model (its Python builds masks, caches and outputs around blocks)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)  # fmt: skip


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the repeated blocks: the children of each outermost nn.ModuleList whose
    children are of one class and hold weight matrices (decoder and encoder layers)."""
    lists: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in lists) or not isinstance(mod, nn.ModuleList):
            continue
        kinds = {type(c) for c in mod}
        if len(mod) and len(kinds) == 1 and sum(p.dim() >= 2 for p in mod[0].parameters()) >= 2:
            lists.append(name)
    return [f"{lst}.{i}" for lst in lists for i in range(len(model.get_submodule(lst)))]


def _structure(block: nn.Module) -> tuple:
    """What makes two blocks the same program: classes, tensor shapes and dtypes, and the
    plain attributes their Python reads (a layer index aside, which only names its place
    in the cache)."""
    out = []
    for path, m in block.named_modules():
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


def _is_cache(v: object) -> bool:
    return (
        type(v).__module__.startswith("transformers.")
        and hasattr(v, "update")
        and hasattr(v, "layers")
    )


@dataclass(frozen=True)
class _Call:
    """One call of a block, taken apart: its tensors by input name, the rest fixed."""

    spec: Any  # pytree spec of (args, kwargs), the cache replaced by None
    slots: tuple  # per leaf: an input name, or ("const", value)
    cache_at: tuple | None  # where the cache sat: ("arg", i) or ("kwarg", name)
    tensors: dict[str, torch.Tensor]
    key: tuple

    def rebuild(self, tensors: dict[str, Any], cache: object) -> tuple[tuple, dict]:
        leaves = [tensors[s] if isinstance(s, str) else s[1] for s in self.slots]
        args, kwargs = tree_unflatten(leaves, self.spec)
        if self.cache_at is not None:
            where, at = self.cache_at
            if where == "arg":
                args = (*args[:at], cache, *args[at + 1 :])
            else:
                kwargs = {**kwargs, at: cache}
        return args, kwargs


def _take_apart(args: tuple, kwargs: dict, past: tuple | None, training: bool) -> _Call:
    cache_at = None
    args, kwargs = list(args), dict(kwargs)
    for i, a in enumerate(args):
        if _is_cache(a):
            cache_at, args[i] = ("arg", i), None
    for k, v in kwargs.items():
        if _is_cache(v):
            cache_at, kwargs[k] = ("kwarg", k), None
    leaves, spec = tree_flatten((tuple(args), kwargs))
    slots, tensors, consts = [], {}, []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            name = f"in{i}"
            slots.append(name)
            tensors[name] = leaf
            consts.append((leaf.dtype, leaf.dim(), leaf.device.type))
        else:
            slots.append(("const", leaf))
            consts.append(repr(leaf))
    if past is not None:
        tensors.update(zip(_PAST, past, strict=True))
    key = (str(spec), tuple(consts), cache_at, past is not None, training)
    return _Call(spec, tuple(slots), cache_at, tensors, key)


class _Recorder:
    """The cache a block sees while traced: it returns the past and new keys and values
    joined along the sequence (what DynamicCache.update returns) and keeps the new ones."""

    def __init__(self, key: torch.Tensor | None, value: torch.Tensor | None) -> None:
        self.past = (key, value)
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None
        self.index: Any = None

    def update(self, key: torch.Tensor, value: torch.Tensor, index: Any = None, *a, **k):
        if self.new is not None:
            raise AutoTPError("the block updates its cache twice in one call: not supported")
        self.new, self.index = (key, value), index
        if self.past[0] is None:
            return key, value
        return (torch.cat([self.past[0], key], dim=-2), torch.cat([self.past[1], value], dim=-2))

    def __getattr__(self, name: str) -> Any:
        raise AutoTPError(
            f"the block calls its cache's `{name}`, which autotp does not model (it models "
            "`update`, as DynamicCache does)\n  hint:   call the model with use_cache=False"
        )


def _call_module(block: nn.Module, call: _Call) -> nn.Module:
    """A module whose forward takes the call's tensors by name and calls the block."""
    holder = nn.Module()
    holder.layer = block
    holder.autotp_hooks_outside = ("layer",)
    names = list(call.tensors)

    def forward(**tensors: torch.Tensor) -> Any:
        rec = None
        if call.cache_at is not None:
            rec = _Recorder(tensors.pop(_PAST[0], None), tensors.pop(_PAST[1], None))
        args, kwargs = call.rebuild(tensors, rec)
        # its forward, not its hooks: a hook on the serial block belongs to the serial
        # model's Python; the parallel model calls the BlockTP's own
        out = holder.layer.forward(*args, **kwargs)
        if rec is None:
            return out
        if rec.new is None:
            raise AutoTPError("the block was given a cache but did not update it")
        holder.index = rec.index
        return out, rec.new[0], rec.new[1]

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
    )
    holder.forward = forward  # type: ignore[method-assign]
    return holder


def _dims(call: _Call, batch: int, seqs: set[int]) -> dict[str, Any]:
    """Dynamic dimensions: the batch (a leading size equal to it) and every size equal to a
    sequence length (new tokens, past, or both); export keeps static what the code fixes."""
    auto = torch.export.Dim.AUTO
    out: dict[str, Any] = {}
    for name, t in call.tensors.items():
        d = {
            i: auto
            for i, s in enumerate(t.shape)
            if s > 1 and ((i == 0 and s == batch) or s in seqs)  # export fixes 0 and 1
        }
        out[name] = d or None
    return out


_UNKNOWN = object()
_CLASSES: dict[type, type] = {}  # block class -> its BlockTP subclass


class _Patterns:
    """The plans of one block structure, by call pattern, shared by its blocks."""

    def __init__(self, tp: int, rules: tuple[Rule, ...], strict: bool) -> None:
        self.tp, self.rules, self.strict = tp, rules, strict
        self.first: Plan | None = None
        self.plans: dict[tuple, list[tuple[Plan, Shard | None]]] = {}
        self.kv: Any = _UNKNOWN  # how the new keys are placed, once a cached call showed it
        self.meta = False  # the serial blocks are on the meta device

    def plan(
        self, block: nn.Module, call: _Call, seqs: set[int], local: bool
    ) -> tuple[Plan, Shard | None]:
        """The plan for `call` and how its keys are placed. `local`: the call's past is
        this rank's own (parallelize), not the whole (simulate)."""
        for p, kv in self.plans.get(call.key, []):
            if accepts(p.traced.gm, self._serial(call.tensors, kv, local, shapes=True)):
                return p, kv
        made = self._plan(block, call, seqs, local)
        self.plans.setdefault(call.key, []).append(made)
        return made

    def _serial(self, tensors: dict[str, torch.Tensor], kv: Any, local: bool, shapes: bool):
        """The call's inputs as the serial block would get them (a local past widened),
        as shapes, or as tensors to trace with (detached: export reads no autograd
        history; on the meta device when the serial block is a program without weights)."""
        meta = self.meta
        out: dict[str, Any] = {
            n: tuple(t.shape) if shapes else t.detach().to("meta") if meta else t.detach()
            for n, t in tensors.items()
        }
        if local and isinstance(kv, Shard) and self.tp > 1:
            for n in _PAST:
                if n in tensors:
                    size = list(tensors[n].shape)
                    size[kv.dim] *= self.tp
                    out[n] = tuple(size) if shapes else out[n].new_zeros(size)
        return out

    def _plan(
        self, block: nn.Module, call: _Call, seqs: set[int], local: bool
    ) -> tuple[Plan, Shard | None]:
        batch = next(iter(call.tensors.values())).shape[0]
        module = _call_module(block, call)
        opts = VocabOptions(gather_outputs=False)  # the new keys stay each rank's own
        common = dict(dims=_dims(call, batch, seqs), like=self.first)
        if call.key[3]:  # a past: given as the keys are placed
            if self.kv is _UNKNOWN and local and self.tp > 1:
                raise AutoTPError(
                    "the model's first cached call to a parallel block came with a past "
                    "already in its cache: each rank's cache must hold its own heads\n"
                    "  hint:   start generation from an empty cache (generate() does)"
                )
            errors = []
            for kv in (Shard(1), None) if self.kv is _UNKNOWN else (self.kv,):
                inputs = dict.fromkeys(_PAST, kv) if kv is not None else None
                tensors = self._serial(call.tensors, kv, local, shapes=False)
                try:
                    p = _plan(module, self.tp, tensors, self.rules, opts, "export", True,
                              inputs=inputs, **common)  # fmt: skip
                except AutoTPError as e:
                    errors.append(e)
                    continue
                if _new_keys_placement(p) == kv:
                    self.kv = kv
                    return p, kv
            raise (
                errors[0]
                if errors
                else AutoTPError(
                    f"{type(block).__name__}: its new keys and values are not placed as its "
                    "past ones can be given (split by heads, or whole)"
                )
            )
        tensors = self._serial(call.tensors, None, local, shapes=False)
        p = _plan(module, self.tp, tensors, self.rules, opts, "export", self.strict, **common)
        if self.first is None:
            self.first = p
        if call.cache_at is None:
            return p, None
        self.kv = _new_keys_placement(p)
        return p, self.kv


def _new_keys_placement(p: Plan) -> Shard | None:
    """The placement of a cached pattern's returned new keys and values (equal, or refused)."""
    out = p.traced.gm.graph.output_node()
    leaves = tree_flatten(out.args[0])[0][-2:]
    found = {str(p.propagation.gathers.get(n, (None,))[0]) for n in leaves}
    if len(found) != 1:
        raise AutoTPError("the block's new keys and values are placed differently")
    return p.propagation.gathers.get(leaves[0], (None, 0))[0]


class BlockTP(nn.Module):
    """A block replaced by its tensor-parallel form: the ranks' shards of its tensors (in
    `ranks`: one for `parallelize`, all for `simulate`) and a graph per call pattern.
    Made by `BlockTP.of`, as an instance of the block's own class too, so that the model's
    Python (isinstance checks, the hooks transformers installs to return hidden states,
    gradient checkpointing's __call__) treats it as the block it replaces."""

    @classmethod
    def of(cls, serial: nn.Module, *args: Any) -> BlockTP:
        kind = type(serial)
        sub = _CLASSES.get(kind)
        if sub is None:
            sub = _CLASSES[kind] = type(f"Parallel{kind.__name__}", (cls, kind),
                                        {"__module__": __name__})  # fmt: skip
        obj = sub.__new__(sub)
        BlockTP.__init__(obj, serial, *args)
        return obj

    def __init__(
        self, serial: nn.Module, patterns: _Patterns, shells: list[nn.Module],
        comms: list[Comm], seed: int,
    ) -> None:  # fmt: skip
        nn.Module.__init__(self)  # not the block class's: its tensors are the shells'
        self.ranks = nn.ModuleList(shells)
        self.__dict__["_serial"] = serial  # read only, never a submodule
        self.__dict__["_patterns"] = patterns
        self.__dict__["_comms"] = comms
        self.__dict__["_graphs"] = {}
        self._seed = seed
        self._index = next((m.layer_idx for m in serial.modules() if hasattr(m, "layer_idx")),
                           None)  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model's Python reads the block's plain attributes
            return getattr(self.__dict__["_serial"], name)

    @property
    def tp(self) -> int:
        return self._patterns.tp

    def splits(self) -> dict[str, Shard]:
        """Split tensors by their name in the block."""
        first = self._patterns.first
        if first is None:
            return {}
        return {k.removeprefix("layer."): v for k, v in first.splits.items()}

    def _apply(self, fn: Callable, recurse: bool = True) -> BlockTP:  # .to(), .double()
        self._graphs.clear()  # rebuilt over the converted tensors
        return super()._apply(fn, recurse)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cache = next((v for v in (*args, *kwargs.values()) if _is_cache(v)), None)
        past = self._past(cache) if cache is not None else None
        call = _take_apart(args, kwargs, past, self.training)
        seqs = {t.shape[1] for t in call.tensors.values() if t.dim() >= 2}
        seqs |= {t.shape[-2] for t in (past or ())}
        seqs |= {a + b for a in seqs for b in seqs}
        serial = self._serial
        modes = {m: m.training for m in serial.modules()}
        try:
            for (_, m), (_, mine) in zip(serial.named_modules(), self.ranks[0].named_modules(),
                                         strict=True):  # fmt: skip
                m.training = mine.training
            with torch.no_grad():
                plan, _ = self._patterns.plan(serial, call, seqs, len(self.ranks) == 1)
        finally:
            for m, v in modes.items():
                m.training = v
        runner = self._runner(plan, call)
        out = runner(**call.tensors)
        if cache is None:
            return out
        out, new_key, new_value = out  # simulate shows them whole: its cache holds all heads
        cache.update(new_key, new_value, self._index)
        return out

    def _past(self, cache: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        layers = getattr(cache, "layers", [])
        if self._index is None or type(layers[0] if layers else None).__name__ not in (
            *_CACHE_LAYERS, "NoneType"
        ):  # fmt: skip
            raise AutoTPError(
                f"{type(cache).__name__} ({type(layers[0]).__name__ if layers else 'no layers'}"
                ") is not a cache autotp can keep split by heads (it keeps DynamicCache's "
                "dynamic and sliding-window layers)\n  hint:   use the default cache, or "
                "call the model with use_cache=False"
            )
        if len(layers) <= self._index:
            return None
        layer = layers[self._index]
        if not getattr(layer, "is_initialized", False) or layer.keys.shape[-2] == 0:
            return None
        return layer.keys, layer.values

    def _runner(self, plan: Plan, call: _Call) -> nn.Module:
        key = id(plan)
        if key not in self._graphs:
            module = _call_module(self._serial, call)
            ranks = []
            for shell, comm in zip(self.ranks, self._comms, strict=True):
                local = {f"layer.{n}": t for n, t in
                         [*shell.named_parameters(), *shell.named_buffers()]}  # fmt: skip
                ranks.append(build_rank_module(
                    module, plan.traced.gm, plan.graph, plan.splits, comm.rank, self.tp, comm, plan,
                    type(self._serial).__name__, self._seed, local=local,
                    device=next(iter(local.values())).device if local else None,
                ))  # fmt: skip
            self._graphs[key] = ranks[0] if len(ranks) == 1 else SimulatedTP(ranks)
        return self._graphs[key]


def _run_once(model: nn.Module, inputs: dict[str, Any]) -> None:
    """Run the model once so that its blocks show how it calls them: really where it has
    weights (no grad; a small batch), else (on the meta device, where the model's Python
    cannot read a value) under torch.export, which the model's Python recognises as
    tracing and whose fake tensors the hooks see."""
    if not any(t.is_meta for t in model.parameters()):
        with torch.no_grad():
            model(**inputs)
        return
    try:
        torch.export.export(model, (), inputs, strict=False)
    except Exception as e:  # noqa: BLE001 - becomes an actionable error
        raise AutoTPError(
            f"running {type(model).__name__} on the meta device failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\n  hint:   build the model with "
            "real tensors (its weights are then replaced by weights=), or pass "
            "example_inputs= it takes"
        ) from e


def _zeros_like_fake(x: Any) -> Any:
    """A captured fake tensor as a real one of its shape (values never matter to tracing)."""
    if isinstance(x, torch.Tensor):
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return x


def _shell(
    block: nn.Module, splits: dict[str, Shard], rank: int, tp: int,
    weights: Weights | None = None, path: str = "",
) -> nn.Module:  # fmt: skip
    """A copy of `block` holding rank `rank`'s shards of its tensors, cut from the block's
    or read from `weights` (the block at `path` of the model)."""
    made: dict[int, torch.Tensor] = {}
    names = {id(t): n for n, t in [*block.named_parameters(), *block.named_buffers()]}

    def new_tensor(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            name = names.get(id(t), "")
            spec = splits.get(name)
            if weights is not None and f"{path}.{name}" in weights:
                local = weights.read(f"{path}.{name}", spec, rank, tp, t.dtype)
            elif t.is_meta and weights is not None:
                raise AutoTPError(
                    f"{path}.{name} is on the meta device and "
                    + f"not in {weights.path}"
                    + "\n  hint:   pass weights= a file or folder holding every tensor of the "
                    "model "
                    "(what save_pretrained of this model class writes)"
                )
            else:
                local = cut(t.detach(), spec, rank, tp).clone()
            made[id(t)] = (nn.Parameter(local, requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else local)  # fmt: skip
        return made[id(t)]

    return _fresh_module(block, new_tensor)


def parallel_blocks(
    model: nn.Module, tp: int, example_inputs: Any, comms: list[Comm], seed: int,
    rules: tuple[Rule, ...], strict: bool, weights: Weights | None = None,
) -> nn.Module:  # fmt: skip
    """A copy of `model` with every block replaced by a BlockTP holding the shards of the
    ranks of `comms` (one for `parallelize`, every rank for `simulate`). With `weights`,
    every tensor comes from there, each rank reading its slices (`model` may be on the
    meta device); else from `model`."""
    from .trace import bind_inputs

    paths = find_blocks(model)
    if not paths:
        raise AutoTPError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of layers) "
            "to parallelize one by one\n  hint:   pass example_inputs to plan the whole model"
        )
    inputs = bind_inputs(model, example_inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs.setdefault("use_cache", False)
    calls: dict[str, tuple[tuple, dict]] = {}
    hooks = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, k, p=p: calls.setdefault(p, (a, k)), with_kwargs=True)
        for p in paths
    ]  # fmt: skip
    try:
        _run_once(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    calls = {p: tree_map(_zeros_like_fake, c) for p, c in calls.items()}
    blocks = {p: model.get_submodule(p) for p in paths}
    memo = {id(b): None for b in blocks.values()}
    copied = copy.deepcopy(model, memo)  # everything but the blocks: those are replaced
    if weights is not None:
        _load_outer(copied, model, weights, tuple(p + "." for p in paths))
    by_structure: dict[tuple, _Patterns] = {}
    for path, block in blocks.items():
        patterns = by_structure.setdefault(_structure(block), _Patterns(tp, rules, strict))
        patterns.meta = any(t.is_meta for t in block.parameters())
        if path not in calls:
            raise AutoTPError(f"the model did not call its block {path} on the example inputs")
        a, k = calls[path]
        call = _take_apart(a, k, None, block.training)
        seqs = {t.shape[1] for t in call.tensors.values() if t.dim() >= 2}
        with torch.no_grad():
            patterns.plan(block, call, seqs, local=False)
        splits = {n.removeprefix("layer."): s for n, s in patterns.first.splits.items()}
        shells = [_shell(block, splits, c.rank, tp, weights, path) for c in comms]
        parent, _, leaf = path.rpartition(".")
        copied.get_submodule(parent)._modules[leaf] = BlockTP.of(block, patterns, shells, comms,
                                                                  seed)  # fmt: skip
    copied.autotp_blocks = tuple(paths)
    return copied


def _load_outer(
    copied: nn.Module, model: nn.Module, weights: Weights, skip: tuple[str, ...]
) -> None:
    """Give `copied`'s tensors outside the blocks their values from `weights`, one at a
    time; a buffer the file lacks (rotary frequencies: not saved) is made by the model's
    own initialiser (`fill_buffers`) where it is on the meta device."""
    names: dict[int, list[str]] = {}
    every = [*copied.named_parameters(remove_duplicate=False),
             *copied.named_buffers(remove_duplicate=False)]  # fmt: skip
    for name, t in every:
        if not name.startswith(skip):
            names.setdefault(id(t), []).append(name)
    done: dict[int, torch.Tensor] = {}
    missing = []
    for name, t in every:
        if name.startswith(skip):
            continue
        if id(t) not in done:
            found = weights.find(names[id(t)])
            if found is None:
                missing.append(name)
                continue
            value = weights.read(found, dtype=t.dtype)
            done[id(t)] = (
                nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) else value
            )
        owner, _, leaf = name.rpartition(".")
        mod = copied.get_submodule(owner)
        where = mod._parameters if leaf in mod._parameters else mod._buffers
        where[leaf] = done[id(t)]
    params = dict(copied.named_parameters(remove_duplicate=False))
    meta = [n for n in missing if n in params and params[n].is_meta]
    if meta:
        raise AutoTPError(
            f"{meta[0]} is not in {weights.path}\n  hint:   pass weights= a file or folder "
            "holding every tensor of the model (what save_pretrained of this model class writes)"
        )
    fill_buffers(copied, weights)


def full_tensors(module: nn.Module, grads: bool) -> dict[str, torch.Tensor | None]:
    """The serial state_dict (or gradients) of a block-form model, shards gathered."""
    import torch.distributed as dist

    out: dict[str, torch.Tensor | None] = {}
    blocks = {p: module.get_submodule(p) for p in module.autotp_blocks}
    skip = tuple(p + "." for p in blocks)
    if grads:
        own = {n: p.grad for n, p in module.named_parameters(remove_duplicate=False)}
    else:
        own = dict(module.state_dict(keep_vars=True))
    for name, t in own.items():
        if not name.startswith(skip):
            out[name] = None if t is None else t.detach()
    for path, block in blocks.items():
        splits = block.splits()
        per_rank = [
            {n: p.grad for n, p in shell.named_parameters()} if grads
            else shell.state_dict(keep_vars=True)
            for shell in block.ranks
        ]  # fmt: skip
        for name in per_rank[0]:
            local = [r[name] for r in per_rank]
            spec = splits.get(name)
            if local[0] is None:
                out[f"{path}.{name}"] = None
                continue
            if spec is not None and len(local) == 1 and block.tp > 1:
                comm = block._comms[0]
                t = local[0].detach().contiguous()
                parts = [torch.empty_like(t) for _ in range(block.tp)]
                dist.all_gather(parts, t, group=comm.group)
                local = parts
            out[f"{path}.{name}"] = gather([t.detach() for t in local], spec)
    return out
