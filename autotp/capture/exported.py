"""What a graph from torch.export holds for: the shapes of its inputs (ints, and
expressions of the sizes that may vary) with their ranges, and export's input guards.
`accepts` checks a call's inputs against them (the region form picks a pattern's graph so);
`SizeGuards` keeps export's guards in a graph that runs, refusing a call outside them with
the sizes named."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeAlias, cast

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import KeyEntry

from ..common.errors import ExampleInputsError, first_line

__all__ = ["SizeGuards", "accepts"]

# an input's shape as export holds it: ints, and sympy expressions of the dynamic sizes
Dims: TypeAlias = tuple[Any, ...]


class SizeGuards(torch.nn.Module):
    """torch.export's input guards (the sizes its graph holds for), refusing a call
    outside them with the sizes named instead of a bare AssertionError."""

    def __init__(self, guards: torch.nn.Module, shapes: dict[str, Dims]) -> None:
        super().__init__()
        self.guards = guards
        self.shapes = ", ".join(f"{k}: ({', '.join(map(str, v))})" for k, v in shapes.items())

    def forward(self, *args: Any) -> Any:
        try:
            return self.guards(*args)
        except AssertionError as e:
            raise ExampleInputsError(
                f"this call's inputs are outside the sizes the plan was traced for "
                f"({first_line(e)}); it holds for {self.shapes} (a size named "
                "s<n> may vary)",
                hint="plan with example inputs of the sizes you call "
                "the model with (a floating input's dimensions after the batch are kept "
                "fixed), or call it at the sizes planned",
            ) from None


_SHAPES = "autotp_input_shapes"
_GUARDS = "autotp_input_guards"


def _input_shapes(ep: torch.export.ExportedProgram) -> tuple[dict[str, Dims], dict[Any, Any]]:
    """Each tensor input's shape as export holds it (ints and sympy expressions of the
    dynamic sizes), and the ranges of those sizes."""
    user = set(ep.graph_signature.user_inputs)
    shapes: dict[str, Dims] = {}
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and n.name in user and isinstance(v, torch.Tensor):
            # torch.Size is typed as ints; a fake tensor's holds SymInts for dynamic sizes
            sizes = cast(tuple[int | torch.SymInt, ...], v.shape)
            shapes[n.name] = tuple(
                d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in sizes
            )
    return shapes, dict(ep.range_constraints)


def accepts(gm: fx.GraphModule, inputs: dict[str, Any]) -> bool:
    """Whether the exported `gm` holds for `inputs` (its tensor inputs, or their shapes,
    by name): every
    static size equal, every dynamic size in its range, every derived size (e.g. a past
    and a new length summed) what its expression gives. A graph from fx holds for none."""
    if _SHAPES not in gm.meta:
        return False
    shapes, ranges = gm.meta[_SHAPES]
    tensors = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if set(tensors) != set(shapes):
        return False
    bound: dict[Any, int] = {}
    derived = []
    for name, dims in shapes.items():
        actual = tensors[name]
        if len(actual) != len(dims):
            return False
        for want, have in zip(dims, actual, strict=True):
            if isinstance(want, int):
                if want != have:
                    return False
            elif getattr(want, "is_Symbol", False):
                if bound.setdefault(want, have) != have:
                    return False
                r = ranges.get(want)
                if r is not None and not (r.lower <= have <= r.upper):
                    return False
            else:
                derived.append((want, have))
    try:
        if not all(int(e.subs(bound)) == have for e, have in derived):
            return False
    except TypeError:  # a symbol no input carries alone
        return False
    guards, names = gm.meta.get(_GUARDS, (None, []))
    if guards is not None:
        try:
            guards(*[torch.empty(inputs[n].shape, dtype=inputs[n].dtype, device="meta")
                     for n in names])  # fmt: skip
        except Exception:  # noqa: BLE001 - a guard that fails: another graph is needed
            return False
    return True


def guards_from_source(code: list[str], paths: list[Any]) -> nn.Module:
    """torch.export's guard module made again from its code (how a stored plan holds it)."""
    from torch.export._unlift import _convert_guards_code_to_fn

    return _tagged(_convert_guards_code_to_fn(code, paths), code, paths)


def _tagged(fn: nn.Module, code: list[str], paths: list[Any]) -> nn.Module:
    # nn.Module.__setattr__ is typed for tensors and modules only; any value is kept
    fn._autotp_source = (list(code), list(paths))  # type: ignore[assignment]
    return fn


@contextlib.contextmanager
def keeping_guard_source() -> Iterator[None]:
    """Within it, torch.export's guard modules keep the code they were made from, which
    stores them (they are functions compiled at run time, which pickle cannot hold)."""
    import torch.export._unlift as unlift

    made = getattr(unlift, "_convert_guards_code_to_fn", None)
    if made is None:  # another torch: guard modules are not stored, nor plans holding them
        yield
        return

    def keeping(
        guards_code: list[str], paths_of_placeholders: list[tuple[KeyEntry, ...]]
    ) -> nn.Module:  # the parameters named as torch's own
        return _tagged(made(guards_code, paths_of_placeholders), guards_code, paths_of_placeholders)

    unlift._convert_guards_code_to_fn = keeping
    try:
        yield
    finally:
        unlift._convert_guards_code_to_fn = made
