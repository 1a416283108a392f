"""Stage 1, trace: capture an unmodified model as a torch.fx graph, with shapes.

`trace` binds the example inputs to the model's forward signature, traces with a Tracer
that proxies buffers (REFERENCE.md trap 4) and records stack traces, and then runs the
graph once under a FakeTensorMode so that every node carries `meta["val"]`: a fake tensor
(shape and dtype, no storage) or a plain Python value. Nothing is computed on real data and
nothing is allocated for weights, so models built on the meta device trace the same way.
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


@dataclass(frozen=True)
class Traced:
    """A traced model: the graph module (sharing the model's tensors) and its inputs."""

    gm: fx.GraphModule
    inputs: dict[str, Any]  # the example inputs, by forward parameter name


def bind_inputs(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Example inputs as a dict keyed by the names of `model.forward`'s parameters."""
    if example_inputs is None:
        maker = getattr(model, "example_inputs", None)
        if not callable(maker):
            raise AutoTPError(
                f"autotp needs example inputs to trace {type(model).__name__}: pass "
                "example_inputs=(tensor, ...) or a dict of keyword arguments, or give the "
                "model an `example_inputs()` method."
            )
        example_inputs = maker()
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


def trace(model: torch.nn.Module, example_inputs: Any = None) -> Traced:
    """Trace `model` symbolically and annotate every node with its example value.

    Arguments of `forward` not given in `example_inputs` are fixed to their defaults
    (e.g. `targets=None`), so the traced graph takes exactly the given arguments.
    """
    inputs = bind_inputs(model, example_inputs)
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
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _annotate(gm, inputs)
    return Traced(gm, inputs)


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
