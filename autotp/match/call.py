"""Each op call canonicalised once into a typed record, whatever its spelling.

`F.softmax(x, -1)`, `x.softmax(dim=-1)`, `nn.Softmax(-1)(x)` and `aten._softmax(x, -1,
False)` all become `Call(op="softmax", args={"input": x, "dim": 3})`: the normalised op
name (ops.py), every argument under one name with its default filled in, dimensions made
non-negative, aten's enums turned back into Python values, and a module's settings read
from the module. A table entry is then a strategy over the record (placements of its
inputs in, the output's placement out) and never parses a spelling.

Shape arguments that the rewrite edits keep where they sit in the node: `Call.path("shape",
2)` is `(3,)` for `x.view(a, b, c)`, `(1, 2)` for `x.view((a, b, c))` and `("shape", 2)`
for `x.reshape(shape=(a, b, c))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import ops

__all__ = ["Call", "canonical"]

# Positional parameters per normalised op, as torch.* functions and Tensor methods spell
# them; "*name" takes the remaining positional arguments as one list (x.view(a, b)).
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "identity": ("input",),
    "size": ("input", "dim"),
    "getattr": ("input", "name"),
    "getitem": ("input", "index"),
    "index": ("input", "indices"),
    "view": ("input", "*shape"),
    "flatten": ("input", "start_dim", "end_dim"),
    "transpose": ("input", "dim0", "dim1"),
    "permute": ("input", "*dims"),
    "unsqueeze": ("input", "dim"),
    "squeeze": ("input", "dim"),
    "unbind": ("input", "dim"),
    "expand": ("input", "*size"),
    "split": ("input", "split_size", "dim"),
    "chunk": ("input", "chunks", "dim"),
    "slice": ("input", "dim", "start", "end", "step"),
    "cat": ("tensors", "dim"),
    "stack": ("tensors", "dim"),
    "mean": ("input", "dim", "keepdim"),
    "sum": ("input", "dim", "keepdim"),
    "softmax": ("input", "dim"),
    "log_softmax": ("input", "dim"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "matmul": ("input", "other"),
    "linear": ("input", "weight", "bias"),
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "addmm": ("input", "mat1", "mat2", "beta", "alpha"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa"),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse"),
    "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index",
                      "reduce", "reduction", "label_smoothing"),
    "dropout": ("input", "p", "training", "inplace"),
}  # fmt: skip

# Where aten's schema orders or spells them otherwise.
_ATEN_SIGNATURES: dict[str, tuple[str, ...]] = {
    "view": ("input", "shape"),
    "permute": ("input", "dims"),
    "expand": ("input", "size", "implicit"),
    "softmax": ("input", "dim", "half_to_float"),
    "log_softmax": ("input", "dim", "half_to_float"),
    "embedding": ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
    "cross_entropy": ("input", "target", "weight", "reduction", "ignore_index",
                      "label_smoothing"),
    "dropout": ("input", "p", "training"),
}  # fmt: skip

# Other names the same parameter goes by (keyword spellings, methods, aten).
_ALIASES: dict[str, str] = {
    "self": "input", "split_size_or_sections": "split_size", "split_sizes": "split_size",
    "train": "training",
}  # fmt: skip
_OP_ALIASES: dict[str, dict[str, str]] = {"view": {"size": "shape"}}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "flatten": {"start_dim": 0, "end_dim": -1},
    "split": {"dim": 0},
    "chunk": {"dim": 0},
    "slice": {"dim": 0, "start": None, "end": None, "step": 1},
    "cat": {"dim": 0},
    "stack": {"dim": 0},
    "mean": {"dim": None, "keepdim": False},
    "sum": {"dim": None, "keepdim": False},
    "layer_norm": {"weight": None, "bias": None},
    "sdpa": {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
             "enable_gqa": False},
    "embedding": {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False,
                  "sparse": False},
    "cross_entropy": {"weight": None, "ignore_index": -100, "reduction": "mean",
                      "label_smoothing": 0.0},
    "dropout": {"p": 0.5, "training": True, "inplace": False},
    "squeeze": {"dim": None},
    "unbind": {"dim": 0},
    "conv1d": {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
}  # fmt: skip

# Dimension arguments made non-negative, against the input's rank or the output's.
_DIMS_OF_INPUT = frozenset({"dim", "dim0", "dim1", "start_dim", "end_dim", "dims"})
_DIMS_OF_OUTPUT = frozenset({"unsqueeze", "stack", "cat"})

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's enum


@dataclass(frozen=True)
class Call:
    """One op call: `op` (normalised name), `args` (canonical name -> value: fx nodes and
    literals), and where each argument that sits in the node is (for shape edits)."""

    node: fx.Node
    op: str
    args: dict[str, Any]
    paths: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    spread: frozenset[str] = frozenset()  # list arguments given as varargs: x.view(a, b)
    module: torch.nn.Module | None = None  # the module of a call_module

    def __getitem__(self, name: str) -> Any:
        return self.args.get(name)

    @property
    def input(self) -> Any:
        return self.args.get("input")

    def path(self, name: str, *index: int) -> tuple[int | str, ...]:
        """Where argument `name` (item `index` of it, for a list) sits in the node."""
        base = self.paths[name]
        if name in self.spread:
            return (int(base[0]) + index[0], *index[1:])
        return (*base, *index)

    def leaves(self) -> list[Any]:
        """Every tensor, node and literal the call reads, lists flattened (elementwise ops
        broadcast all of their operands alike)."""
        return _flatten([self.node.args, self.node.kwargs])

    def others(self, *names: str) -> list[Any]:
        """The leaves of every argument but `names` (what must then be replicated)."""
        return _flatten([v for k, v in self.args.items() if k not in names])


def _flatten(a: Any) -> list[Any]:
    """The leaves of nested lists, tuples, dicts and slices (a slice's start, stop, step)."""
    if isinstance(a, (list, tuple)):
        return [leaf for x in a for leaf in _flatten(x)]
    if isinstance(a, dict):
        return _flatten(list(a.values()))
    if isinstance(a, slice):
        return _flatten([a.start, a.stop, a.step])
    return [a]


def canonical(node: fx.Node, gm: fx.GraphModule, op: str | None = None) -> Call:
    """The record for `node`. Ops without a signature (elementwise ops) keep their
    positional arguments as "0", "1", ..."""
    op = op or ops.op_name(node, gm)
    if node.op == "call_module":
        return _module_call(node, gm, op)
    aten = isinstance(node.target, torch._ops.OpOverload)
    sig = (_ATEN_SIGNATURES.get(op) if aten else None) or _SIGNATURES.get(op)
    args: dict[str, Any] = {}
    paths: dict[str, tuple[int | str, ...]] = {}
    spread: set[str] = set()
    if sig is None:
        sig = tuple(str(i) for i in range(len(node.args)))
    for i, name in enumerate(sig):
        if name.startswith("*"):
            name = name[1:]
            rest = node.args[i:]
            if len(rest) == 1 and _is_sequence(rest[0]):  # x.view((a, b)) or a shape node
                args[name], paths[name] = rest[0], (i,)
            elif rest:
                args[name], paths[name] = list(rest), (i,)
                spread.add(name)
            break
        if i < len(node.args):
            args[name], paths[name] = node.args[i], (i,)
    else:
        for i in range(len(sig), len(node.args)):  # past the signature: kept by position
            args[str(i)], paths[str(i)] = node.args[i], (i,)
    aliases = {**_ALIASES, **_OP_ALIASES.get(op, {})}
    for key, value in node.kwargs.items():
        name = aliases.get(key, key)
        args[name], paths[name] = value, (key,)
    for name, default in _DEFAULTS.get(op, {}).items():
        args.setdefault(name, default)
    if aten and op == "cross_entropy":
        args["reduction"] = _REDUCTIONS.get(args["reduction"], args["reduction"])
    if aten and op == "embedding" and args["padding_idx"] == -1:
        args["padding_idx"] = None  # aten's "none"; F.embedding made negative ones positive
    _normalise_dims(node, op, args)
    return Call(node, op, args, paths, frozenset(spread))


def _is_sequence(a: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return True
    # a node: a shape computed elsewhere (y.size()) unless it is one size
    return isinstance(a, fx.Node) and not isinstance(a.meta.get("val"), (int, torch.SymInt))


def _module_call(node: fx.Node, gm: fx.GraphModule, op: str) -> Call:
    """A module's settings are its attributes; its input is the first argument."""
    mod = gm.get_submodule(str(node.target))
    args: dict[str, Any] = {"input": node.args[0] if node.args else node.kwargs.get("input")}
    paths: dict[str, tuple[int | str, ...]] = {"input": (0,) if node.args else ("input",)}
    for i, a in enumerate(node.args[1:], start=1):
        args[str(i)] = a
    if op == "cross_entropy":
        args["target"], paths["target"] = node.args[1], (1,)
    names = {
        "softmax": ("dim",),
        "layer_norm": ("normalized_shape", "weight", "bias", "eps"),
        "embedding": ("weight", "padding_idx", "max_norm", "scale_grad_by_freq", "sparse"),
        "cross_entropy": ("weight", "ignore_index", "reduction", "label_smoothing"),
        "dropout": ("p", "inplace"),
        "linear": ("weight", "bias", "in_features", "out_features"),
        "conv1d": ("weight", "bias", "stride", "padding", "dilation", "groups", "padding_mode"),
    }.get(op, ())
    for name in names:
        args[name] = getattr(mod, name, None)
    if op == "dropout":
        args["training"] = None  # the module's own train()/eval() flag, at call time
    _normalise_dims(node, op, args)
    return Call(node, op, args, paths, frozenset(), mod)


def _normalise_dims(node: fx.Node, op: str, args: dict[str, Any]) -> None:
    ref = node if op in _DIMS_OF_OUTPUT else args.get("input")
    v = ref.meta.get("val") if isinstance(ref, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return
    nd = v.dim()
    for name in _DIMS_OF_INPUT & args.keys():
        d = args[name]
        if isinstance(d, int) and not isinstance(d, bool):
            args[name] = d + nd if d < 0 else d
        elif isinstance(d, (list, tuple)) and all(isinstance(x, int) for x in d):
            args[name] = [x + nd if x < 0 else x for x in d]
