"""Region plans kept on disk, keyed by the program they plan, so that a model planned once
loads without tracing again (torch.export of a decoder layer takes about half a second).

The key is a digest of everything planning reads: every module's class and the source
files defining it, its plain attributes and config, its tensors' shapes, dtypes and
devices, the example inputs' shapes and values, tp and the options, the default rules'
sources, autotp's sources, the source of every module loaded from outside the installed
packages (the user's own code), and the versions of Python, torch and transformers. A
model whose key cannot be read for certain (a hook, an attribute of unknown kind, custom
rules, a class without a source file) is planned as always and not cached.

A hit is the plan pickled when it was made, grown by every call pattern planned since
(a prompt, a decoded token: `grew`), so the first calls of a new process plan nothing
either. Tensors of the traced graphs are stored as shapes (they are the traced twin's
unfilled ones; values are read from the model when building), constants with values.

Where: $AUTOTP_PLAN_CACHE (a folder; "off" turns caching off), else
$XDG_CACHE_HOME/autotp/plans (~/.cache/autotp/plans). The files are pickles: keep the
folder your own, as you would torch's compile caches.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import gc
import hashlib
import inspect
import io
import operator
import os
import pickle
import sys
import sysconfig
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..capture.exported import guards_from_source
from ..common.hooks import has_hooks
from ..common.tensor_names import names_by_tensor
from ..match.rule import Rule

if TYPE_CHECKING:
    from .region_plan import RegionPlan

__all__ = ["directory", "program_key", "load", "store", "grew"]

FORMAT = 8  # of the files: a new one misses every older file (8: Propagation.means)


def directory() -> Path | None:
    """Where plans are kept, or None when caching is off."""
    given = os.environ.get("AUTOTP_PLAN_CACHE")
    if given is not None:
        return None if given.strip().lower() in ("", "0", "off", "false", "no") else Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autotp" / "plans"


_OBJECTS: contextvars.ContextVar[dict[Any, Any]] = contextvars.ContextVar("autotp_key_objects")


class _Uncacheable(Exception):
    """Something planning may read whose value the key cannot hold for certain."""


# -- the key ----------------------------------------------------------------------------


def program_key(
    model: nn.Module, tp: int, inputs: dict[str, Any], rules: tuple[Rule, ...],
    strict: bool, sequence_parallel: bool,
) -> str | None:  # fmt: skip
    """The digest of what planning `model` with these arguments reads, or None when
    part of it cannot be read for certain (then nothing is cached)."""
    if directory() is None or not _default_rules(rules):
        return None
    token = _OBJECTS.set({})
    try:
        items = (
            FORMAT, sys.version, torch.__version__, _version("transformers"),
            _sources(), tp, strict, sequence_parallel, str(torch.get_default_dtype()),
            tuple(sorted((k, _value(v, ())) for k, v in inputs.items())),
            _modules(model),
        )  # fmt: skip
    except _Uncacheable:
        return None
    finally:
        _OBJECTS.reset(token)
    return hashlib.sha256(repr(items).encode()).hexdigest()


def _default_rules(rules: tuple[Rule, ...]) -> bool:
    from autotp.rules import DEFAULT_RULES

    return len(rules) == len(DEFAULT_RULES) and all(
        a is b for a, b in zip(rules, DEFAULT_RULES, strict=True)
    )


def _version(package: str) -> str | None:
    module = sys.modules.get(package)
    return getattr(module, "__version__", None) if module is not None else None


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(sorted({os.path.join(d, "") for d in dirs} |
                        {os.path.join(os.path.realpath(d), "") for d in dirs}))  # fmt: skip


_USER: dict[tuple[str, str], str | None] = {}  # (module, file) -> its real path, if the user's


def _user_file(name: str, file: str) -> str | None:
    """The real path of a module's source if it is autotp's or the user's (not installed
    or standard), else None; decided once per module."""
    known = _USER.get((name, file), "")
    if known != "":
        return known
    found = None
    if file.endswith(".py") and not file.startswith(_library_dirs()):
        real = os.path.realpath(file)
        if not real.startswith(_library_dirs()) and os.path.exists(real):
            found = real
    if name == "autotp" or name.startswith("autotp."):
        found = os.path.realpath(file)
    _USER[(name, file)] = found
    return found


def _sources() -> tuple[tuple[str, str], ...]:
    """Digests of autotp's and its rules' sources, and of every loaded module from outside
    the installed packages and the standard library: the user's code, which a traced
    model may call."""
    out = []
    for name, module in sorted(sys.modules.items()):
        file = getattr(module, "__file__", None)
        real = _user_file(name, file) if isinstance(file, str) else None
        if real is not None:
            out.append((name, _file_digest(real)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _digest_of(path: str, mtime: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


def _file_digest(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        raise _Uncacheable(path) from None
    return _digest_of(path, st.st_mtime_ns, st.st_size)


def _code(obj: Any) -> tuple[Any, ...]:
    """A class or function by name and the digest of the file defining it."""
    try:
        file = inspect.getsourcefile(obj)
    except TypeError:  # a builtin: its name is all there is
        file = None
    name = (getattr(obj, "__module__", None), getattr(obj, "__qualname__", repr(obj)))
    if file is None:
        if getattr(obj, "__module__", None) in (None, "__main__"):
            raise _Uncacheable(obj)
        return name
    return (*name, _file_digest(os.path.realpath(file)))


def _class(kind: type) -> tuple[Any, ...]:
    """A class: each class of its MRO by name and file, and what may be patched at run
    time without a file changing (a library that swaps a class's forward or a module's
    function, as kernel libraries do): the functions each class and its module hold now."""
    return _files(kind), tuple(_patchable(c) for c in kind.__mro__ if c not in (object, nn.Module))


@functools.lru_cache(maxsize=1024)  # a class reloaded (edited) is another class
def _files(kind: type) -> tuple[Any, ...]:
    return tuple(_code(c) for c in kind.__mro__ if c not in (object, nn.Module))


def _patchable(kind: type) -> tuple[Any, ...]:
    memo = _OBJECTS.get()
    module = sys.modules.get(kind.__module__)
    key = ("module", kind.__module__)
    if key not in memo:
        names = vars(module).items() if module is not None else ()
        memo[key] = tuple(sorted((k, _named(v)) for k, v in names if inspect.isfunction(v)))
    methods = tuple(sorted((k, _named(v)) for k, v in vars(kind).items() if inspect.isfunction(v)))
    return methods, memo[key]


def _named(f: Any) -> tuple[str, str]:
    return getattr(f, "__module__", None) or "", getattr(f, "__qualname__", "")


_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "training"})


def _modules(model: nn.Module) -> tuple[Any, ...]:
    from ..integrations.hf import collects

    out = []
    for path, m in model.named_modules(remove_duplicate=False):
        if has_hooks(m, collects):
            raise _Uncacheable(f"a hook on {path}")
        out.append((path, *_module(m, ())))
    return tuple(out)


def _module(m: nn.Module, path: tuple[int, ...]) -> tuple[Any, ...]:
    """A module's class, mode, own attributes and tensors (not its children's)."""
    attrs = tuple(
        (k, _value(v, path))
        for k, v in sorted(vars(m).items())
        if k not in _MODULE_STATE and not k.endswith("hooks") and not k.startswith("_autotp")
    )
    tensors = tuple(
        (k, type(t).__name__, tuple(t.shape), str(t.dtype), t.device.type, t.requires_grad)
        for k, t in [*m._parameters.items(), *m._buffers.items()]
        if t is not None
    )
    return _class(type(m)), m.training, attrs, tensors


# attributes whose value is new in every process (a string hash), not part of a program
_PER_PROCESS = frozenset({"_original_object_hash"})
_SMALL = 1 << 16  # elements of a tensor attribute hashed by value


def _value(v: Any, path: tuple[int, ...]) -> Any:
    """A plain, comparable form of an attribute's value; _Uncacheable where there is none."""
    if isinstance(v, (bool, int, str, type(None))):
        return v
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (torch.dtype, torch.device, torch.Size, enum.Enum)):
        return repr(v)
    if id(v) in path:
        return ("cycle", path.index(id(v)))
    inner = (*path, id(v))
    if len(inner) > 12:
        raise _Uncacheable("nested too deep")
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_value(x, inner) for x in v))
    if isinstance(v, (set, frozenset)):
        return (type(v).__name__, tuple(sorted(repr(_value(x, inner)) for x in v)))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((repr(k), _value(x, inner)) for k, x in v.items())))
    if isinstance(v, torch.Tensor):  # an input, or an attribute: by value where it has one
        if v.is_meta:
            return ("meta", tuple(v.shape), str(v.dtype))
        if isinstance(v, FakeTensor) or v.numel() > _SMALL:
            raise _Uncacheable("a tensor too large to read")
        data = v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        return ("tensor", tuple(v.shape), str(v.dtype), hashlib.sha256(data).hexdigest())
    if isinstance(v, nn.Module):  # held outside _modules (a kernel function)
        if v._modules:
            raise _Uncacheable("a module with children held outside _modules")
        return ("module", *_module(v, inner))
    if isinstance(v, type) or inspect.isfunction(v) or inspect.isbuiltin(v):
        return _code(v)
    if inspect.ismethod(v):
        owner = v.__self__
        held = _class(type(owner)) if isinstance(owner, nn.Module) else _value(owner, inner)
        return ("method", _code(v.__func__), held)
    if isinstance(v, functools.partial):
        return ("partial", _value(v.func, inner), _value(v.args, inner), _value(v.keywords, inner))
    state = getattr(v, "__dict__", None)
    if isinstance(state, dict) and not callable(v):  # a config, a plain object
        memo = _OBJECTS.get()
        if id(v) not in memo:  # a config every module holds: read once
            items = {
                k: x
                for k, x in state.items()
                if k not in _PER_PROCESS and (not callable(x) or isinstance(x, type))
            }
            memo[id(v)] = ("object", _class(type(v)), _value(items, inner))
        return memo[id(v)]
    raise _Uncacheable(type(v).__qualname__)


# -- storing and reading ----------------------------------------------------------------


def load(key: str | None, rules: tuple[Rule, ...]) -> RegionPlan | None:
    """The plan stored under `key`, or None."""
    folder = directory()
    if key is None or folder is None:
        return None
    try:
        data = (folder / f"{key}.plan").read_bytes()
    except OSError:
        return None
    try:
        with warnings.catch_warnings(), _no_collection():
            warnings.simplefilter("ignore")  # pytree's notes on how specs were pickled
            plan = cast("RegionPlan", _Reader(io.BytesIO(data), rules).load())  # as stored
    except Exception:  # noqa: BLE001 - a file of another torch: plan again, store anew
        return None
    remember(key, plan)
    return plan


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """The garbage collector paused: every object a plan's read makes is kept, so a
    collection it would set off (a full one, over everything a process with torch and
    transformers holds, a fifth of a second) finds nothing to free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def store(key: str | None, plan: RegionPlan) -> None:
    """Keep `plan` under `key` (no key: nothing); a plan that cannot be pickled is not kept."""
    folder = directory()
    if key is None or folder is None:
        return
    remember(key, plan)
    try:
        buf = io.BytesIO()
        _Writer(buf, _twins(plan)).dump(plan)
    except Exception:  # noqa: BLE001 - something of the plan has no stored form
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, folder / f"{key}.plan")  # whole or not at all, for every rank
    except OSError:
        return


_OWNERS: weakref.WeakKeyDictionary[Any, tuple[str, weakref.ref[RegionPlan]]] = (
    weakref.WeakKeyDictionary()
)


def remember(key: str | None, plan: RegionPlan) -> None:
    """Store `plan` again under `key` when one of its regions plans a new call pattern."""
    if key is None:
        return
    for region in plan.regions:
        _OWNERS[region.patterns] = (key, weakref.ref(plan))


def grew(patterns: Any) -> None:
    """`patterns` (of a region) planned a new call pattern: store its plan with it."""
    owner = _OWNERS.get(patterns)
    if owner is None:
        return
    plan = owner[1]()
    if plan is not None:
        store(owner[0], plan)


def _twins(plan: RegionPlan) -> set[int]:
    """The tensors of the traced twins (never filled: see regions.state.twin) in `plan`'s
    graphs, which hold them as attributes and as their nodes' example values."""
    out: set[int] = set()
    for region in plan.regions:
        patterns: Any = region.patterns  # regions.form's: every plan of its program
        plans = [patterns.first, *(p for made in patterns.plans.values() for p, _ in made)]
        for p in plans:
            out.update(names_by_tensor(p.traced.gm))
    return out


class _Writer(pickle.Pickler):
    """A plan as data: rules by name, ops by their names, fake tensors by shape, the
    traced twins' tensors by shape (never filled), graph modules as graph and attributes."""

    def __init__(self, f: io.BytesIO, twins: set[int]) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.twins = twins

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Rule):  # by name, with its split: a block's rule may have been
            # narrowed to a fallback (fewer key/value heads than ranks)
            return ("rule", obj.name, obj.split, obj.fallback)
        if isinstance(obj, torch._ops.OpOverload):
            return ("op", obj._schema.name, obj._overloadname)
        if isinstance(obj, torch._ops.OpOverloadPacket):
            return ("op", obj._qualified_op_name, None)
        if isinstance(obj, torch._ops.HigherOrderOperator):
            # unannotated in torch
            return ("hop", obj.name())  # type: ignore[no-untyped-call]
        if isinstance(obj, FakeTensor):
            return ("fake", tuple(obj.shape), obj.dtype, str(obj.fake_device), obj.requires_grad)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return (_same, (obj.node.hint,))  # a traced size's example value
        if isinstance(obj, fx.GraphModule):
            return (_new_graph_module, (), _graph_module_state(obj), None, None, _fill_graph_module)
        if isinstance(obj, fx.Graph):
            skip = ("_owning_module", "_owners", "_find_nodes_lookup_table")
            state = {k: v for k, v in vars(obj).items() if k not in skip}
            return (_new_graph, (), state, None, None, _fill_graph)
        if isinstance(obj, torch.Tensor) and id(obj) in self.twins:  # once, however named
            return (_unfilled, (_spec(obj),))
        if type(obj).__name__ == "GuardsFn" and hasattr(obj, "_autotp_source"):
            return (guards_from_source, obj._autotp_source)
        return NotImplemented


# a tensor never filled: shape, dtype, device, whether a Parameter, requires_grad
_Spec = tuple[tuple[int, ...], torch.dtype, str, bool, bool]
# a graph module: its graph, tensors and submodules by target, meta, class name, plain attributes
_GraphModuleState = tuple[fx.Graph, dict[str, Any], dict[str, Any], str, dict[str, Any]]


def _spec(t: torch.Tensor) -> _Spec:
    return tuple(t.shape), t.dtype, str(t.device), isinstance(t, nn.Parameter), t.requires_grad


def _graph_module_state(gm: fx.GraphModule) -> _GraphModuleState:
    root: dict[str, Any] = dict(gm.named_parameters(remove_duplicate=False))
    root.update(gm.named_buffers(remove_duplicate=False))
    for n in gm.graph.nodes:  # constants, and the guards a widened export calls
        if n.op in ("get_attr", "call_module") and n.target not in root:
            with contextlib.suppress(AttributeError):
                root[n.target] = operator.attrgetter(n.target)(gm)
    plain = {
        k: v
        for k, v in vars(gm).items()
        if not k.startswith("_") and k not in ("training", "graph") and not callable(v)
    }
    return gm.graph, root, gm.meta, type(gm).__name__, plain


def _same(v: Any) -> Any:
    return v


def _new_graph_module() -> fx.GraphModule:
    return fx.GraphModule.__new__(fx.GraphModule)


def _fill_graph_module(gm: fx.GraphModule, state: _GraphModuleState) -> None:
    graph, root, meta, name, plain = state
    fx.GraphModule.__init__(gm, root, graph, name)
    gm.meta.update(meta)
    for k, v in plain.items():
        gm.__dict__.setdefault(k, v)


def _new_graph() -> fx.Graph:
    return fx.Graph.__new__(fx.Graph)


def _fill_graph(graph: fx.Graph, state: dict[str, Any]) -> None:
    from torch.fx.graph import _FindNodesLookupTable

    graph.__dict__.update(state)
    graph._owning_module = None
    graph._find_nodes_lookup_table = _FindNodesLookupTable()
    for n in graph.nodes:
        graph._find_nodes_lookup_table.insert(n)


class _Reader(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, rules: tuple[Rule, ...]) -> None:
        super().__init__(f)
        self.rules = {r.name: r for r in rules}
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "rule":
            rule, split, fallback = self.rules[pid[1]], pid[2], pid[3]
            if rule.split == split and rule.fallback == fallback:
                return rule
            return dataclasses.replace(rule, split=split, fallback=fallback)
        if kind == "op":
            namespace, _, name = pid[1].partition("::")
            packet = getattr(getattr(torch.ops, namespace), name)
            return packet if pid[2] is None else getattr(packet, pid[2])
        if kind == "hop":
            return getattr(torch.ops.higher_order, pid[1])
        _, shape, dtype, device, grad = pid  # a fake tensor, made directly: a fake mode's
        # own factory call costs five times as much, and a plan holds hundreds
        meta = torch.empty(shape, dtype=dtype, device="meta")
        t = FakeTensor(self.fake, meta, torch.device(device))
        return t.requires_grad_(grad) if grad else t


def _unfilled(spec: _Spec) -> torch.Tensor:
    shape, dtype, device, param, grad = spec
    t = torch.empty(shape, dtype=dtype, device=device)  # never written: costs no memory
    if param:
        return nn.Parameter(t, requires_grad=grad)
    return t.requires_grad_(grad) if grad else t
