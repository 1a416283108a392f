"""Stage 1, trace: capture an unmodified model as a torch.fx graph, with shapes.

Two front-ends feed the same rules, propagation and rewrite:
  "fx"      torch.fx symbolic tracing with a Tracer that proxies buffers
            (torch 2.13 does not by default) and records stack traces; the graph holds torch functions, methods
            and leaf modules, and sizes are computed from `x.size()` in the graph.
  "export"  torch.export (non-strict), for models fx cannot trace (transformers 5.x);
            the graph holds aten ops, batch and sequence dims are
            exported as dynamic so other batch sizes and lengths run.
"auto" tries fx, then export, and names both failures if neither works.

After tracing, the graph runs once under a FakeTensorMode on the example inputs so that
every node carries `meta["val"]`: a fake tensor (shape and dtype, no storage) or a plain
Python value. Nothing is computed on real data and nothing is allocated for weights, so
models built on the meta device trace the same way.
"""

from __future__ import annotations

import inspect
import linecache
import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import AutoTPError

__all__ = ["Traced", "trace", "bind_inputs"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_AUTOTP_DIR = os.path.dirname(__file__)


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True


FRONTENDS = ("auto", "fx", "export")


@dataclass(frozen=True)
class Traced:
    """A traced model: the graph module (sharing the model's tensors) and its inputs."""

    gm: fx.GraphModule
    inputs: dict[str, Any]  # the example inputs, by forward parameter name
    frontend: str = "fx"  # which front-end produced gm: "fx" or "export"


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


def _user_frame(exc: BaseException) -> str:
    """'file:line: code' of the innermost frame outside torch and autotp, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fn = os.path.abspath(fr.filename)
        if not fn.startswith(_TORCH_DIR) and not fn.startswith(_AUTOTP_DIR):
            code = (fr.line or linecache.getline(fr.filename, fr.lineno or 0)).strip()
            return f"{fr.filename}:{fr.lineno}: {code}"
    return "<unknown>"


def _from_config(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Token ids for a model with a Hugging Face style config (vocab_size), 2 x 8."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device)}


def trace(model: torch.nn.Module, example_inputs: Any = None, frontend: str = "auto") -> Traced:
    """Trace `model` and annotate every node with its example value.

    With the fx front-end, arguments of `forward` not given in `example_inputs` are fixed
    to their defaults (e.g. `targets=None`), so the graph takes exactly the given
    arguments; the export front-end likewise takes the given keyword arguments.
    """
    if frontend not in FRONTENDS:
        raise AutoTPError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    inputs = bind_inputs(model, example_inputs)
    if frontend == "export":
        gm = _export(model, inputs)
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
    _annotate(gm, inputs)
    return Traced(gm, inputs, "fx" if frontend == "auto" else frontend)


def _export(model: torch.nn.Module, inputs: dict[str, Any]) -> fx.GraphModule:
    """torch.export (non-strict) with dynamic batch and sequence dimensions; the
    unlifted module keeps the parameters as attributes shared with `model`."""
    dims: dict[str, Any] = {}
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            dims[name] = {i: torch.export.Dim.DYNAMIC for i in range(min(v.dim(), 2))}
        else:
            dims[name] = None
    try:
        ep = torch.export.export(model, (), inputs, dynamic_shapes=dims, strict=False)
    except Exception as e:  # noqa: BLE001 - becomes an actionable error
        raise AutoTPError(
            f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"\n  source: {_user_frame(e)}\n  hint:   the model must be exportable with "
            "torch.export(strict=False) for the given example inputs (no data-dependent "
            "Python control flow; a cache or other non-tensor output turned off, e.g. "
            "use_cache=False)"
        ) from e
    return ep.module()


def _fx_trace(model: torch.nn.Module, inputs: dict[str, Any]) -> fx.GraphModule:
    sig = inspect.signature(model.forward)
    concrete = {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in inputs
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.default is not inspect.Parameter.empty
    }
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes an actionable error
        where = _user_frame(e)
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
            f"cannot trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            f"  source: {where}\n  hint:   {hint}"
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _FakeRunner(fx.Interpreter):
    """Runs a graph on fake tensors and stores each node's result in `node.meta['val']`."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = result
        return result


def _annotate(gm: fx.GraphModule, inputs: dict[str, Any]) -> None:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    # Placeholders follow forward's parameters in order; those fixed by concrete_args keep
    # their default value (fx guards them with an `_assert_is_none`).
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [fake.get(n.target, n.args[0] if n.args else None) for n in placeholders]
    with mode:
        try:
            _FakeRunner(gm).run(*args)
        except Exception as e:  # noqa: BLE001
            raise AutoTPError(
                f"running the traced {gm.__class__.__name__} on the example inputs failed: "
                f"{type(e).__name__}: {e}\n  source: {_user_frame(e)}\n"
                "  hint:   check that the example inputs are what forward expects"
            ) from e
