"""Stage 1, trace: capture an unmodified model as a torch.fx graph, with shapes.

Two front-ends feed the same rules, propagation and rewrite:
  "fx"      torch.fx symbolic tracing with a Tracer that proxies buffers (torch 2.13 does
            not by default) and records stack traces; the graph holds torch functions,
            methods and leaf modules, and sizes are computed from `x.size()` in the graph.
  "export"  torch.export (non-strict), for models fx cannot trace (transformers 5.x); the
            graph holds aten ops; the batch, and the sequence of token inputs, are
            exported as dynamic so other batch sizes and lengths run.
"auto" tries fx, then export, and names both failures if neither works.

What tracing would silently drop is kept in the graph or refused:
  - `torch.no_grad()` / `enable_grad` regions: fx records them as `set_grad` and
    `restore_grad` calls (export, run with grad enabled, keeps them as its own
    higher-order op, which propagation treats as any op);
  - a custom `torch.autograd.Function`: fx records one opaque call of its `apply`, so its
    backward runs (export traces only its forward: refused);
  - `torch.inference_mode()` and enabled `torch.autocast` regions inside forward: refused
    with the fx front-end (wrap the call of the parallel module instead);
  - Python that branches on `self.training`: the model is traced again with every module
    in the other mode; if the graphs differ, `Traced.mode_dependent` says where, and the
    parallel module refuses to run in a mode other than the one it was planned in.
Module hooks are checked by the plan (plan.py), which knows which modules survive.

After tracing, the graph runs once under a FakeTensorMode on the example inputs so that
every node carries `meta["val"]`: a fake tensor (shape and dtype, no storage) or a plain
Python value. Nothing is computed on real data and nothing is allocated for weights, so
models built on the meta device trace the same way.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import linecache
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..common.errors import _TORCH_DIR, AutoTPError, first_line, user_frame
from ..common.tools import tools_aside
from .annotate import annotate
from .exported import _GUARDS, _SHAPES, SizeGuards, _input_shapes, keeping_guard_source

__all__ = ["Traced", "trace", "bind_inputs"]


class _Tracer(fx.Tracer):
    """fx's tracer, recording for each node the user's source line that made it (the
    innermost frame outside torch, all `errors.source_line` reads). fx's own
    `record_stack_traces` captures and formats the whole stack for every node, which is
    most of the cost of tracing a large model."""

    proxy_buffer_attributes = True

    def __init__(self, source_lines: bool = True) -> None:
        super().__init__()
        self.source_lines = source_lines

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_proxy(self, *args: Any, **kwargs: Any) -> fx.Proxy:
        proxy = super().create_proxy(*args, **kwargs)
        if self.source_lines and not proxy.node.stack_trace:
            proxy.node.stack_trace = _source_frame()
        return proxy


class _Proxy(fx.Proxy):
    """fx's Proxy, deciding `a, b = proxy` (an unpacking) from the calling code's
    instructions read once per code object: fx disassembles the whole function at every
    unpacking, a tenth of tracing a model of many layers."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = sys._getframe(1)
        n = _unpacked(frame.f_code).get(frame.f_lasti)
        if n is not None:
            return (self[i] for i in range(n))  # type: ignore[index]
        return self.tracer.iter(self)


@functools.lru_cache(maxsize=1024)
def _unpacked(code: types.CodeType) -> dict[int, int]:
    """Offset -> length of each UNPACK_SEQUENCE in `code`, at the offset a frame stopped
    at when it called `__iter__` (the instruction's own, or one between it and the
    instruction before, as fx's own test takes the first instruction at or after it)."""
    out: dict[int, int] = {}
    previous = -1
    for inst in dis.get_instructions(code):
        if inst.opname == "UNPACK_SEQUENCE":
            for offset in range(previous + 1, inst.offset + 1):
                out[offset] = inst.argval
        previous = inst.offset
    return out


def _source_frame() -> str | None:
    """The innermost calling frame outside torch and this module, formatted as a
    traceback entry."""
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return None
    file, line = frame.f_code.co_filename, frame.f_lineno
    code = linecache.getline(file, line).strip()
    return f'  File "{file}", line {line}, in {frame.f_code.co_name}\n    {code}\n'


def set_grad(mode: bool) -> bool:
    """Enter a grad-mode region of the traced forward; returns the mode to restore."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(mode)
    return prev


def restore_grad(prev: bool) -> None:
    """Leave a grad-mode region: back to the mode of the caller, whatever it was."""
    torch._C._set_grad_enabled(prev)


_FUNCTION_CALLS: dict[type[torch.autograd.Function], Callable[..., Any]] = {}


def _function_call(cls: type[torch.autograd.Function]) -> Callable[..., Any]:
    """One graph target per custom autograd Function: calls `cls.apply`, so both its
    forward and its backward run in the traced module."""
    if cls not in _FUNCTION_CALLS:

        def apply(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)  # type: ignore[no-untyped-call]  # unannotated

        apply.__name__ = apply.__qualname__ = f"{cls.__name__}.apply"
        _FUNCTION_CALLS[cls] = apply
    return _FUNCTION_CALLS[cls]


def _proxies(args: Any, kwargs: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []
    torch.utils._pytree.tree_map(
        lambda a: found.append(a) if isinstance(a, fx.Proxy) else None, (args, kwargs)
    )
    return found


@contextlib.contextmanager
def _keep_what_fx_drops(tracer: _Tracer) -> Iterator[None]:
    """While fx traces: record grad-mode changes and custom autograd Functions as graph
    nodes, refuse inference_mode and autocast regions."""
    set_enabled = torch._C._set_grad_enabled
    apply = torch.autograd.Function.__dict__["apply"]
    inference_enter = torch.autograd.grad_mode.inference_mode.__enter__
    autocast_enter = torch.amp.autocast_mode.autocast.__enter__
    regions: list[tuple[bool, fx.Node]] = []  # (mode before, the set_grad node)
    mode = [True]  # the grad mode as the traced code sees it

    def patched_set_enabled(m: bool) -> None:
        set_enabled(m)
        m = bool(m)
        if m == mode[0]:
            return
        if regions and m == regions[-1][0]:  # back to the mode before the region
            tracer.graph.call_function(restore_grad, (regions.pop()[1],))
        else:
            regions.append((mode[0], tracer.graph.call_function(set_grad, (m,))))
        mode[0] = m

    def patched_apply(cls: type[torch.autograd.Function], /, *args: Any, **kwargs: Any) -> Any:
        found = _proxies(args, kwargs)
        if not found:
            return apply.__func__(cls, *args, **kwargs)
        return found[0].tracer.create_proxy("call_function", _function_call(cls), args, kwargs)

    def refuse(original: Any, what: str, hint: str) -> Any:
        """An __enter__ that lets a disabled region through and refuses an enabled one."""

        def enter(self: Any) -> Any:
            if getattr(self, "mode", True) is False or getattr(self, "_enabled", True) is False:
                return original(self)
            raise AutoTPError(f"{what} inside forward is lost by tracing: {hint}")

        return enter

    grad = torch.is_grad_enabled()
    set_enabled(True)  # the traced code starts with grad on, as mode[0] says
    _patch(torch._C, "_set_grad_enabled", patched_set_enabled)
    _patch(torch.autograd.Function, "apply", classmethod(patched_apply))
    refuse_inference = refuse(
        inference_enter, "inference", "call the parallel module under torch.inference_mode()"
    )
    refuse_autocast = refuse(
        autocast_enter, "autocast", "call the parallel module under torch.autocast(...)"
    )
    _patch(torch.autograd.grad_mode.inference_mode, "__enter__", refuse_inference)
    _patch(torch.amp.autocast_mode.autocast, "__enter__", refuse_autocast)
    try:
        yield
    finally:
        set_enabled(grad)
        _patch(torch._C, "_set_grad_enabled", set_enabled)
        _patch(torch.autograd.Function, "apply", apply)
        _patch(torch.autograd.grad_mode.inference_mode, "__enter__", inference_enter)
        _patch(torch.amp.autocast_mode.autocast, "__enter__", autocast_enter)


def _patch(owner: object, name: str, value: object) -> None:
    """Set `owner.name` (a torch function or method, swapped while tracing and then put
    back): their declared types admit no replacement, so this is a plain setattr."""
    setattr(owner, name, value)


# how the whole graph is captured: torch.fx's symbolic tracing, torch.export, or fx first
Frontend = Literal["auto", "fx", "export"]
FRONTENDS: tuple[Frontend, ...] = get_args(Frontend)


@dataclass(frozen=True)
class Traced:
    """A traced model: the graph module (sharing the model's tensors) and its inputs."""

    gm: fx.GraphModule
    inputs: dict[str, Any]  # the example inputs, by forward parameter name
    frontend: str = "fx"  # which front-end produced gm: "fx" or "export"
    # where the graph changes with train()/eval() (Python reading self.training), or None
    mode_dependent: str | None = None


def bind_inputs(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Example inputs as a dict keyed by the names of `model.forward`'s parameters."""
    if example_inputs is None:
        maker = getattr(model, "example_inputs", None)
        if callable(maker):
            example_inputs = maker()
        else:
            example_inputs = _from_config(model)
        if example_inputs is None:
            raise AutoTPError(
                f"autotp needs example inputs to trace {type(model).__name__}: pass "
                "example_inputs=(tensor, ...) or a dict of keyword arguments, or give the "
                "model an `example_inputs()` method."
            )
    sig = inspect.signature(model.forward)
    try:
        if isinstance(example_inputs, dict):
            bound = sig.bind_partial(**example_inputs)
        else:
            if isinstance(example_inputs, torch.Tensor):
                example_inputs = (example_inputs,)
            bound = sig.bind_partial(*example_inputs)
    except TypeError as e:
        raise AutoTPError(
            f"the example inputs do not fit {type(model).__name__}.forward{sig}: {e}"
        ) from None
    return dict(bound.arguments)


def _from_config(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Token ids for a model with a Hugging Face style config (vocab_size), 2 x 8; an
    encoder-decoder's decoder is given the same ids."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    out = {"input_ids": ids.to(device)}
    takes = inspect.signature(model.forward).parameters
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in takes:
        out["decoder_input_ids"] = out["input_ids"]
    return out


def trace(
    model: torch.nn.Module, example_inputs: Any = None, frontend: Frontend = "auto",
    dims: dict[str, Any] | None = None,
) -> Traced:  # fmt: skip
    """Trace `model` and annotate every node with its example value.

    With the fx front-end, arguments of `forward` not given in `example_inputs` are fixed
    to their defaults (e.g. `targets=None`), so the graph takes exactly the given
    arguments; the export front-end likewise takes the given keyword arguments. `dims`
    (export only) gives each input's dynamic dimensions in place of `dynamic_dims`.
    """
    if frontend not in FRONTENDS:
        raise AutoTPError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    with tools_aside():  # hooks of CommDebugMode, profilers, ...: not the model's
        return _trace(model, example_inputs, frontend, dims)


def _trace(
    model: torch.nn.Module, example_inputs: Any, frontend: str, dims: dict[str, Any] | None
) -> Traced:
    inputs = bind_inputs(model, example_inputs)
    if frontend == "export" or dims is not None:
        gm = _export(model, inputs, dims)
        frontend = "export"
    else:
        try:
            gm = _fx_trace(model, inputs)
        except AutoTPError as fx_error:
            if frontend == "fx":
                raise
            try:
                gm = _export(model, inputs)
            except AutoTPError as export_error:
                raise AutoTPError(
                    f"cannot trace {type(model).__name__} with either front-end.\n"
                    f"torch.fx: {fx_error}\n\ntorch.export: {export_error}"
                ) from export_error
            frontend = "export"
    frontend = "fx" if frontend == "auto" else frontend
    dependent = _mode_dependence(model, inputs, frontend, gm)
    annotate(gm, inputs)
    return Traced(gm, inputs, frontend, dependent)


def _mode_dependence(
    model: torch.nn.Module, inputs: dict[str, Any], frontend: str, gm: fx.GraphModule
) -> str | None:
    """Where the captured graph changes with train()/eval() (the modes the user can switch
    the parallel module to), or None. fx traces again in each mode and compares the code
    (a dropout module is a call in the graph, so only Python reading self.training shows);
    export freezes everything, so the ops each mode dispatches on fake tensors are
    compared instead (much cheaper than exporting again). The model's flags are restored."""
    flags = {m: m.training for m in model.modules()}
    if frontend == "export":
        capture: Any = _dispatched
        try:
            mine = capture(model, inputs)
        except Exception:  # noqa: BLE001 - not runnable on fake tensors: export again
            capture, mine = (lambda mod, x: _export(mod, x).code.splitlines()), gm.code.splitlines()
    else:
        capture = lambda mod, x: _graph_lines(_fx_graph(mod, x, stack_traces=False)[1])  # noqa: E731
        mine = _graph_lines(gm.graph)
    try:
        for mode in (True, False):
            if all(v == mode for v in flags.values()):
                continue  # already traced so
            for m in flags:
                m.training = mode
            theirs = capture(model, inputs)
            if theirs != mine:
                i = next(
                    (k for k, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                    min(len(mine), len(theirs)),
                )
                a = mine[i].strip() if i < len(mine) else "(nothing)"
                b = theirs[i].strip() if i < len(theirs) else "(nothing)"
                where = "train" if mode else "eval"
                return f"in {where} mode it runs `{b}` where the planned mode runs `{a}`"
    finally:
        for m, v in flags.items():
            m.training = v
    return None


# TorchDispatchMode's __init_subclass__ and __init__ are unannotated in torch
class _OpRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The aten ops a forward dispatches, with their non-tensor arguments."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        plain = [a for a in leaves if isinstance(a, (bool, int, float, str))]
        self.ops.append(f"{func}{plain}")
        return func(*args, **kwargs)


def _dispatched(model: torch.nn.Module, inputs: dict[str, Any]) -> list[str]:
    """The ops one forward dispatches, run on fake tensors (nothing computed); for a
    model on the meta device, on meta tensors, which is several times cheaper."""
    params = list(model.parameters())
    if params and all(t.is_meta for t in params):
        try:
            return _dispatched_on_meta(model, inputs)
        except Exception:  # noqa: BLE001 - its Python reads a value: run it on fake tensors
            pass
    recorder = _OpRecorder()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad(), mode, recorder:
        model(**fake)
    return recorder.ops


def _dispatched_on_meta(model: torch.nn.Module, inputs: dict[str, Any]) -> list[str]:
    recorder = _OpRecorder()
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad(), recorder:
        model(**meta)
    return recorder.ops


def dynamic_dims(value: Any) -> dict[int, Any] | None:
    """The dimensions of an example input that vary between calls: the batch (dim 0) of
    every tensor, and the sequence (dim 1) of token-like (integer or boolean) tensors:
    ids, masks, positions, labels. A floating input keeps its other dimensions static,
    since after the batch they are channels, mel bins or features of the model's own
    weights (pixel_values [B, C, H, W], input_features [B, mel, T])."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    token_like = not (value.is_floating_point() or value.is_complex())
    count = 2 if token_like else 1
    return {i: torch.export.Dim.DYNAMIC for i in range(min(value.dim(), count))}


def _widened(inputs: dict[str, Any], dims: dict[str, Any]) -> dict[str, Any]:
    """The inputs with every dynamic dimension of size 1 doubled (the values repeated):
    torch.export specialises a dimension it sees as 1, so an example batch of one would
    fix the batch. Only the tracing sees these; shapes are then read from the real ones."""
    out = dict(inputs)
    for name, spec in dims.items():
        v = inputs[name]
        for d in spec or {}:
            if isinstance(v, torch.Tensor) and v.shape[d] == 1:
                v = torch.cat([v, v], d)
        out[name] = v
    return out


def _export(
    model: torch.nn.Module, inputs: dict[str, Any], dims: dict[str, Any] | None = None
) -> fx.GraphModule:
    """torch.export (non-strict) with the dimensions that really vary made dynamic (see
    `dynamic_dims`, or `dims` as given); the unlifted module keeps the parameters as
    attributes shared with `model`, and `accepts` reads the input shapes it holds for."""
    widen = dims is None
    if dims is None:
        dims = {name: dynamic_dims(v) for name, v in inputs.items()}
    functions: list[type[torch.autograd.Function]] = []
    apply = torch.autograd.Function.__dict__["apply"]

    def noting_apply(cls: type[torch.autograd.Function], /, *args: Any, **kwargs: Any) -> Any:
        functions.append(cls)
        return apply.__func__(cls, *args, **kwargs)

    try:
        _patch(torch.autograd.Function, "apply", classmethod(noting_apply))
        try:
            # with grad enabled, so that no_grad regions inside forward are recorded (a
            # wrap_with_set_grad_enabled call); under an outer no_grad they would vanish
            with torch.enable_grad():
                given = _widened(inputs, dims) if widen else inputs
                ep = torch.export.export(model, (), given, dynamic_shapes=dims, strict=False)
        finally:
            _patch(torch.autograd.Function, "apply", apply)
    except Exception as e:  # noqa: BLE001 - becomes an actionable error
        raise AutoTPError(
            f"torch.export failed: {type(e).__name__}: {first_line(e)}\n  source: {user_frame(e)}",
            hint="the model must be exportable with "
            "torch.export(strict=False) for the given example inputs (no data-dependent "
            "Python control flow; a cache or other non-tensor output turned off, e.g. "
            "use_cache=False)",
        ) from e
    if functions:
        cls = functions[0]
        hint = (
            "use frontend='fx' if the model can be symbolically traced (autotp keeps the "
            "Function there), or replace the Function by plain tensor ops"
        )
        if "grouped_mm" in cls.__qualname__:  # transformers' default MoE experts kernel
            hint = (
                'build the model with experts_implementation="batched_mm" (a '
                "from_pretrained / config keyword of transformers): its experts are plain "
                "tensor ops that autotp splits"
            )
        raise AutoTPError(
            f"{type(model).__name__} calls the custom autograd Function "
            f"{cls.__module__}.{cls.__qualname__}: torch.export keeps only its forward, so "
            f"its backward would be lost.",
            hint=f"{hint}",
        )
    with keeping_guard_source():  # so that a plan holding it can be stored
        gm = ep.module()
    gm.meta[_SHAPES] = _input_shapes(ep)
    guards = getattr(gm, "_guards_fn", None) if widen else None
    if isinstance(guards, torch.nn.Module):
        gm._guards_fn = SizeGuards(guards, gm.meta[_SHAPES][0])
    for n in list(gm.graph.nodes):
        if n.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)  # it pins the device traced on: meta, for a plan without
            # weights, while the ranks run on the CPU or a GPU
        elif n.op == "call_module" and n.target == "_guards_fn" and not widen:
            # the caller checks the inputs with `accepts`, in their serial shapes (some
            # arrive split): the guards move there
            gm.meta[_GUARDS] = (gm.get_submodule("_guards_fn"), [a.name for a in n.args])
            gm.graph.erase_node(n)
            gm.delete_submodule("_guards_fn")
    gm.recompile()
    return gm


def _fx_trace(model: torch.nn.Module, inputs: dict[str, Any]) -> fx.GraphModule:
    tracer, graph = _fx_graph(model, inputs)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _graph_lines(graph: fx.Graph) -> list[str]:
    """A graph as comparable lines (no code generation: cheap for large models)."""
    return [f"{n.name} = {n.op}[{n.target}]{n.args}{n.kwargs}" for n in graph.nodes]


def _fx_graph(
    model: torch.nn.Module, inputs: dict[str, Any], stack_traces: bool = True
) -> tuple[fx.Tracer, fx.Graph]:
    sig = inspect.signature(model.forward)
    concrete = {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in inputs
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.default is not inspect.Parameter.empty
    }
    tracer = _Tracer(source_lines=stack_traces)
    try:
        with _keep_what_fx_drops(tracer):
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes an actionable error
        where = user_frame(e)
        if isinstance(e, AutoTPError):
            raise AutoTPError(f"{e}\n  source: {where}") from e
        data_dependent = isinstance(e, fx.proxy.TraceError) or "Proxy" in str(e)
        hint = (
            "the forward uses a tensor's value in Python control flow (if/while/assert on a "
            "tensor, or iterating over one), which symbolic tracing cannot capture; make the "
            "decision with tensor ops (torch.where, masking) or from Python values such as "
            "config fields"
            if data_dependent
            else "make the forward traceable by torch.fx, or report the model"
        )
        raise AutoTPError(
            f"cannot trace {type(model).__name__}: {type(e).__name__}: {e}\n  source: {where}",
            hint=f"{hint}",
        ) from e
    return tracer, graph
