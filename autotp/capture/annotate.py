"""Annotation: a traced graph runs once on fake tensors made from the example inputs, and
each node keeps its example value in `node.meta['val']` (shapes, dtypes, devices: what
propagation and the rules read). Nothing is computed and no memory is taken.

A model of many equal layers repeats the same calls on values of the same shapes; running
each on fake tensors costs most of planning a large model. A call whose result can only
depend on what the key below holds (a torch op, an operator, a Tensor method, a leaf
module of torch.nn, on arguments that are fake tensors and plain values) runs once per
key; later nodes with that key get fresh fake tensors of the same shapes, strides and
dtypes. Anything else runs as it is: the model's own functions, in-place calls, calls
with side effects (grad mode), values fake tensors keep (a constant), symbolic sizes.
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from ..common.errors import ExampleInputsError, describe_place, node_place, user_frame
from ..common.hooks import has_hooks

# operator functions that write into their first argument
_WRITES = frozenset(
    {"setitem", "delitem", "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imod", "imul",
     "imatmul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor"}
)  # fmt: skip
# where torch's functional ops live (its grad-mode and seed setters live elsewhere)
_TORCH_OPS = frozenset({"torch", "torch.functional", "torch.nn.functional", "torch._C._nn",
                        "torch._C._VariableFunctions", "torch._C._linalg",
                        "torch._C._special", "torch._C._fft"})  # fmt: skip
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.layout, type(Ellipsis))  # fmt: skip
# a fake or meta tensor by what fixes a result's shapes: (shape, stride, dtype, device,
# requires_grad)
_TensorSig: TypeAlias = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device, bool]
# a call by what fixes its result: (op, callee, args' and kwargs' signatures)
_Key: TypeAlias = tuple[str, Any, Any, Any]


class _NoKey(Exception):
    """A value the key cannot hold: the call runs."""


def annotate(gm: fx.GraphModule, inputs: dict[str, Any]) -> None:
    """Run `gm` on fake tensors made from `inputs` (by forward's parameter name) and store
    each node's result in `node.meta['val']`; an error says which node failed and why."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    # Placeholders follow forward's parameters in order; those fixed by concrete_args keep
    # their default value (fx guards them with an `_assert_is_none`).
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [fake.get(n.target, n.args[0] if n.args else None) for n in placeholders]
    runner = _FakeRunner(gm, mode)
    # a failing op is told by the error below, with the node and the user's line; fake
    # tensors would also log it, with torch's own traceback, on stderr
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with mode:
            runner.run(*args)
    except Exception as e:  # noqa: BLE001
        first = str(e).split("\n\nWhile executing")[0].strip().splitlines()
        what = (
            f"running the traced {gm.__class__.__name__} on the example inputs failed: "
            f"{type(e).__name__}: {first[0] if first else ''}"
        )
        shapes = ", ".join(
            f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        )
        hint = (
            f"check that the example inputs ({shapes}) are what forward expects: a "
            "sequence within the model's positions, the dtypes it reads"
        )
        node = runner.current
        where = node_place(node) if node is not None else {"source": user_frame(e)}
        raise ExampleInputsError(f"{what}\n{describe_place(where)}", what=what, where=where,
                                 hint=hint, node=node) from e  # fmt: skip
    finally:
        quiet.setLevel(level)


class _FakeRunner(fx.Interpreter):
    """Runs a graph on fake tensors and stores each node's result in `node.meta['val']`;
    a call seen before with equal arguments (see the module) is not run again."""

    current: fx.Node | None = None

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm)
        self.mode = mode
        self.seen: dict[_Key, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        if n.op not in ("call_function", "call_method", "call_module"):
            result = super().run_node(n)
        else:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                key = self._key(n, args, kwargs)
                if key is not None and key in self.seen:
                    result = _fresh(self.seen[key], self.mode)
                else:
                    result = getattr(self, n.op)(n.target, args, kwargs)
                    if key is not None and _keepable(result):
                        self.seen[key] = result
        n.meta["val"] = result
        return result

    def _key(self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Key | None:
        callee = self._callee(n, args)
        if callee is None:
            return None
        try:
            return (n.op, callee, _sig(args), _sig(kwargs))
        except _NoKey:
            return None

    def _callee(self, n: fx.Node, args: tuple[Any, ...]) -> Any:
        """What the call runs, as a key part, or None where its result may depend on
        more than its arguments or it has an effect."""
        target = n.target
        if n.op == "call_method":
            if not isinstance(target, str) or not args or type(args[0]) is not FakeTensor:
                return None
            written = target.endswith("_") or target in ("__setitem__", "__delitem__")
            return None if written or target.startswith("__i") else target
        if n.op == "call_module":
            assert isinstance(target, str)
            return _module_key(self.module.get_submodule(target))
        if isinstance(target, torch._ops.OpOverload):
            return None if target._schema.is_mutable else target
        name = getattr(target, "__name__", "")
        if not isinstance(name, str) or name.endswith("_") or name.startswith(("_", "set")):
            return None
        where = getattr(target, "__module__", None)
        if where == "_operator":
            return None if name in _WRITES else target
        if where in _TORCH_OPS or target is getattr:
            return target
        return None


def _module_key(
    m: torch.nn.Module,
) -> tuple[type[torch.nn.Module], str, bool, tuple[tuple[str, _TensorSig | None], ...]] | None:
    """A torch.nn leaf module (no hooks, not in place) by class, settings and tensors."""
    if not type(m).__module__.startswith("torch.nn.modules.") or getattr(m, "inplace", False):
        return None
    if has_hooks(m) or m._modules:
        return None
    tensors = tuple(  # by shape: a leaf module's result never reads its tensors' values
        (k, None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad))
        for k, t in [*m._parameters.items(), *m._buffers.items()]
    )
    return (type(m), m.extra_repr(), m.training, tensors)


def _tensor_sig(t: torch.Tensor) -> _TensorSig:
    if isinstance(t, FakeTensor):
        if t.constant is not None:
            raise _NoKey  # a value fake tensors keep: results may read it
        device = t.fake_device
    elif t.is_meta:
        device = t.device
    else:
        raise _NoKey  # a real tensor: an op may read its values (a mask)
    if not all(type(s) is int for s in (*t.shape, *t.stride())):
        raise _NoKey  # a symbolic size: its relations are the shape environment's
    return (tuple(t.shape), t.stride(), t.dtype, device, t.requires_grad)


def _sig(v: Any) -> Any:
    """A hashable form of an argument that fixes the result's shapes, or _NoKey."""
    if isinstance(v, _PLAIN):
        return (type(v), v)
    if isinstance(v, torch.Tensor):
        return ("tensor", _tensor_sig(v))
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_sig(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _sig(x)) for k, x in v.items()))
    if isinstance(v, slice):
        return ("slice", _sig(v.start), _sig(v.stop), _sig(v.step))
    raise _NoKey  # a symbolic size, an object of the model's


def _keepable(v: Any) -> bool:
    if isinstance(v, FakeTensor):
        return v.constant is None and not any(
            isinstance(s, torch.SymInt) for s in (*v.shape, *v.stride())
        )
    if isinstance(v, torch.Tensor):
        return False
    if type(v) in (tuple, list, torch.Size):  # not a named tuple: _fresh remakes these
        return all(_keepable(x) for x in v)
    return isinstance(v, _PLAIN)


def _fresh(v: Any, mode: FakeTensorMode) -> Any:
    """A result like `v`, with new fake tensors (made directly: a fake mode's factory call
    costs several times as much)."""
    if isinstance(v, FakeTensor):
        with unset_fake_temporarily():  # a plain meta tensor, not one the mode makes
            meta = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        out = FakeTensor(mode, meta, v.fake_device)
        return out.requires_grad_(True) if v.requires_grad else out
    if type(v) in (tuple, list):
        return type(v)(_fresh(x, mode) for x in v)
    return v  # immutable: a plain value, a torch.Size


__all__ = ["annotate"]
