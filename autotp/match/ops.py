"""The normalised op vocabulary: every spelling of an operation maps to one name.

`op_name(node, gm)` turns `F.gelu`, `nn.GELU`, `x.gelu()`... into "gelu", `x.view` and
`torch.reshape` into "view", and so on. Matching (match.py) and sharding propagation
(sharding/) both speak this vocabulary, so a rule or a propagation entry written once covers
every spelling. Linear layers are recognised separately (match.find_linears), because a
linear is an op *with a weight parameter*, whatever function computes it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "op_name",
    "aliases",
    "mutates",
    "POINTWISE",
    "INPLACE",
    "IDENTITY",
    "LAYOUT",
    "GLUE",
    "NORM",
]

_FUNCTIONS: dict[object, str] = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.floordiv: "floordiv", operator.neg: "neg", torch.neg: "neg",
    operator.pow: "pow", torch.pow: "pow", torch.tanh: "tanh", torch.exp: "exp",
    torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.sigmoid: "sigmoid", torch.erf: "erf",
    F.gelu: "gelu", F.relu: "relu", F.silu: "silu", F.sigmoid: "sigmoid", F.tanh: "tanh",
    F.dropout: "dropout", torch.dropout: "dropout", torch.where: "where",
    torch.masked_fill: "masked_fill", operator.eq: "eq", operator.ne: "ne",
    operator.lt: "lt", operator.gt: "gt", operator.le: "le", operator.ge: "ge",
    torch.eq: "eq", torch.abs: "abs",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    F.linear: "linear", torch.addmm: "addmm",
    F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax",
    F.layer_norm: "layer_norm", F.embedding: "embedding",
    F.scaled_dot_product_attention: "sdpa",
    torch.transpose: "transpose", torch.permute: "permute", torch.reshape: "view",
    torch.flatten: "flatten", torch.split: "split", torch.chunk: "chunk",
    torch.unsqueeze: "unsqueeze", torch.cat: "cat", torch.stack: "stack",
    operator.getitem: "getitem", getattr: "getattr",
    F.cross_entropy: "cross_entropy", torch.squeeze: "squeeze", torch.unbind: "unbind",
    F.conv1d: "conv1d",
    operator.iadd: "add_", operator.isub: "sub_", operator.imul: "mul_",
    operator.itruediv: "div_",
}  # fmt: skip

_METHODS: dict[str, str] = {
    "view": "view", "reshape": "view", "transpose": "transpose", "permute": "permute",
    "split": "split", "chunk": "chunk", "flatten": "flatten", "unsqueeze": "unsqueeze",
    "squeeze": "squeeze", "unbind": "unbind", "size": "size", "dim": "dim",
    "contiguous": "identity", "clone": "identity", "detach": "identity", "to": "identity",
    "type_as": "identity", "float": "identity", "double": "identity", "half": "identity",
    "bfloat16": "identity",
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow", "neg": "neg",
    "tanh": "tanh", "exp": "exp", "sqrt": "sqrt", "rsqrt": "rsqrt", "sigmoid": "sigmoid",
    "relu": "relu", "abs": "abs", "masked_fill": "masked_fill", "eq": "eq",
    "softmax": "softmax", "log_softmax": "log_softmax", "matmul": "matmul",
    "expand": "expand", "mean": "mean", "sum": "sum",
    "add_": "add_", "sub_": "sub_", "mul_": "mul_", "div_": "div_",
    "masked_fill_": "masked_fill_",
}  # fmt: skip

# torch.export graphs hold aten ops; they map by overload packet name.
_ATEN: dict[str, str] = {
    "add": "add", "sub": "sub", "rsub": "sub", "mul": "mul", "div": "div", "neg": "neg",
    "pow": "pow", "tanh": "tanh", "exp": "exp", "sqrt": "sqrt", "rsqrt": "rsqrt",
    "sigmoid": "sigmoid", "gelu": "gelu", "relu": "relu", "silu": "silu", "erf": "erf",
    "abs": "abs", "dropout": "dropout", "where": "where", "masked_fill": "masked_fill",
    "eq": "eq", "ne": "ne", "lt": "lt", "gt": "gt", "le": "le", "ge": "ge",
    "__and__": "and", "logical_and": "and", "__or__": "or", "logical_not": "not",
    "matmul": "matmul", "bmm": "matmul", "linear": "linear", "addmm": "addmm",
    "softmax": "softmax", "_softmax": "softmax", "log_softmax": "log_softmax",
    "_log_softmax": "log_softmax", "layer_norm": "layer_norm", "embedding": "embedding",
    "scaled_dot_product_attention": "sdpa", "transpose": "transpose", "permute": "permute",
    "view": "view", "reshape": "view", "_unsafe_view": "view", "flatten": "flatten",
    "split": "split", "split_with_sizes": "split", "chunk": "chunk", "unsqueeze": "unsqueeze",
    "squeeze": "squeeze", "unbind": "unbind", "conv1d": "conv1d",
    "sym_size": "size", "to": "identity", "_to_copy": "identity", "alias": "identity",
    "contiguous": "identity", "clone": "identity", "detach": "identity",
    "type_as": "identity", "cross_entropy_loss": "cross_entropy", "slice": "slice",
    "cat": "cat", "stack": "stack", "index": "index", "expand": "expand", "mean": "mean",
    "sum": "sum",
    "_assert_tensor_metadata": "assert",
    "add_": "add_", "sub_": "sub_", "mul_": "mul_", "div_": "div_",
    "masked_fill_": "masked_fill_",
}  # fmt: skip

_MODULES: dict[type, str] = {
    nn.Linear: "linear", nn.LayerNorm: "layer_norm", nn.Embedding: "embedding",
    nn.Dropout: "dropout", nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu",
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softmax: "softmax", nn.Identity: "identity",
    nn.CrossEntropyLoss: "cross_entropy", nn.Conv1d: "conv1d",
}  # fmt: skip

# Elementwise ops (with broadcasting): a split operand keeps its split.
POINTWISE = frozenset(
    "add sub mul div neg pow tanh exp sqrt rsqrt sigmoid erf gelu relu silu abs dropout "
    "where masked_fill eq ne lt gt le ge and or not".split()
)
# In-place elementwise ops (x.add_(y), x += y): the first argument keeps its placement.
INPLACE = frozenset("add_ sub_ mul_ div_ masked_fill_".split())
# Ops that return their first argument's values unchanged (copies, casts, contiguity).
IDENTITY = frozenset({"identity"})
# Ops that move elements between dimensions without computing.
LAYOUT = frozenset(
    "view transpose permute split chunk unbind getitem index flatten unsqueeze squeeze "
    "slice cat stack expand".split()
)
# What the matcher contracts into one "glue" region between the structural ops.
GLUE = POINTWISE | INPLACE | IDENTITY | LAYOUT | {"softmax", "log_softmax", "mean"}
NORM = frozenset({"layer_norm"})


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """The normalised name of what `node` computes (its fx op for non-calls)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return _MODULES.get(type(mod), f"module:{type(mod).__name__}")
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            packet = node.target.overloadpacket.__name__
            return _ATEN.get(packet, f"aten.{packet}")
        name = _FUNCTIONS.get(node.target)
        if name:
            return name
        named: str = getattr(node.target, "__name__", str(node.target))
        return named
    if node.op == "call_method":
        return _METHODS.get(str(node.target), str(node.target))
    return node.op


# Ops whose result may share memory with their input (a change to one changes the other),
# by their normalised name; aten ops say so in their schema.
_ALIASING = frozenset(
    "view flatten unflatten transpose permute movedim moveaxis swapaxes swapdims unsqueeze "
    "squeeze slice select getitem index expand expand_as split split_with_sizes chunk "
    "tensor_split hsplit vsplit dsplit unbind narrow as_strided diagonal unfold identity t "
    "alias detach view_as reshape real imag view_as_real view_as_complex getattr".split()
)


def aliases(node: fx.Node) -> bool:
    """May `node`'s result share memory with its first argument?"""
    if node.op not in ("call_function", "call_method"):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # an aten op: its schema marks returned aliases
        return any(r.alias_info is not None for r in schema.returns)
    return op_name(node, None).removeprefix("aten.") in _ALIASING  # type: ignore[arg-type]


def mutates(node: fx.Node) -> bool:
    """Does `node` change an argument in place (`y.relu_()`, `y[:, 0] = 0`, `out=`)?"""
    if node.op not in ("call_function", "call_method"):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
    ):
        return True
    name = op_name(node, None).removeprefix("aten.")  # type: ignore[arg-type]
    return (name.endswith("_") and not name.startswith("_")) or name in (
        "setitem", "iadd", "isub", "imul", "itruediv",
    ) or "out" in node.kwargs  # fmt: skip
