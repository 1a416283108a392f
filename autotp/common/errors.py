"""The one exception type autotp raises, and the helpers that make its messages actionable.

Every refusal names what a user needs to find and fix the problem: the fx node, the module
path, the line of the user's source that produced the node, the rule involved, and a hint.
"""

from __future__ import annotations

import linecache
import os
import re
import traceback
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "AutoTPError",
    "UsageError",
    "CheckpointError",
    "TrainingStopped",
    "describe_node",
    "describe_place",
    "first_line",
    "node_error",
    "node_place",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_AUTOTP_DIR = os.path.dirname(os.path.dirname(__file__))  # the autotp package


class AutoTPError(Exception):
    """Raised when autotp cannot prove a rewrite correct, or is used incorrectly.

    `title` heads the panel the command line draws around the message; the subclasses
    below say which kind of problem the user has to fix."""

    title = "autotp cannot split this model"

    def __init__(
        self, message: str = "", *, what: str | None = None,
        where: dict[str, str] | None = None, hint: str | None = None,
        node: fx.Node | None = None,
    ) -> None:  # fmt: skip
        # the hint is data (`hint`); the text every other tool sees ends with it
        super().__init__(f"{message}\n  hint:   {hint}" if hint else message)
        self.message = message  # without the hint
        lines = message.splitlines()
        self.what: str = what if what is not None else (lines[0] if lines else "")
        self.where: dict[str, str] = dict(where or {})  # node, module, source, rule
        self.hint: str | None = hint
        self.node: fx.Node | None = node  # the fx node a refusal is about, if there is one

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled (a worker's error sent to its parent) with its fields; the node stays
        return (_rebuilt, (type(self), self.message, self.what, self.where, self.hint))


def _rebuilt(
    kind: type[AutoTPError], message: str, what: str, where: dict[str, str], hint: str | None
) -> AutoTPError:
    return kind(message, what=what, where=where, hint=hint)


class ExampleInputsError(AutoTPError):
    """The model cannot run on the example inputs it was given (a shape or a dtype its
    forward does not take): the caller may say how to give others in its own words."""

    title = "autotp: check the example inputs"


class UsageError(AutoTPError):
    """An argument, file or name the user gave cannot be used as given."""

    title = "autotp: check the command"


class CheckpointError(AutoTPError):
    """A checkpoint cannot be read, resumed from or written."""

    title = "autotp: checkpoint problem"


class TrainingStopped(AutoTPError):
    """Training stopped before it could do harm (a NaN loss, say); checkpoints are intact."""

    title = "autotp: training stopped"


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost user module that produced `node`, or '<root>'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, _type = list(stack.values())[-1]
    return str(path) or "<root>"


def source_line(node: fx.Node) -> str:
    """The user's source line that produced `node` ('file:line: code'), or '<unknown>'."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return "<unknown>"
    lines = [ln.strip() for ln in str(trace).strip().splitlines()]
    # fx records 'File "x.py", line N, in fn' followed by the code. The innermost frame
    # outside torch itself is the user's statement (torch-function calls add fx frames).
    frames = [
        (lines[i][len("File ") :].replace('"', ""), lines[i + 1] if i + 1 < len(lines) else "")
        for i in range(len(lines))
        if lines[i].startswith("File ")
    ]
    user = [f for f in frames if _TORCH_DIR not in f[0]] or frames
    if not user:
        return lines[-1]
    where, code = user[-1]
    m = re.match(r"(.*), line (\d+), in (.*)$", where)
    return f"{m.group(1)}:{m.group(2)}: {code}" if m else f"{where}: {code}"


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's text (or of a text), "" when it has none: what an
    error that quotes another keeps of it."""
    lines = str(e).splitlines()
    return lines[0] if lines else ""


def user_frame(exc: BaseException) -> str:
    """'file:line: code' of the innermost frame of `exc` outside torch and autotp, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fn = os.path.abspath(fr.filename)
        if not fn.startswith(_TORCH_DIR) and not fn.startswith(_AUTOTP_DIR):
            code = (fr.line or linecache.getline(fr.filename, fr.lineno or 0)).strip()
            return f"{fr.filename}:{fr.lineno}: {code}"
    return "<unknown>"


def describe_node(node: fx.Node) -> str:
    """Multi-line description of where `node` comes from."""
    return describe_place(node_place(node))


def describe_place(where: dict[str, str]) -> str:
    """An error's `where` as the lines its text shows ("  node:   ...", "  module: ...")."""
    return "\n".join(f"  {key + ':':<8}{value}" for key, value in where.items())


def node_place(node: fx.Node) -> dict[str, str]:
    """Where `node` comes from, as an error's `where`: the node, its module path and the
    user's source line."""
    return {
        "node": node.format_node() or node.name,
        "module": module_path(node),
        "source": source_line(node),
    }


def node_error(node: fx.Node, what: str, hint: str, rule: str | None = None) -> AutoTPError:
    """An AutoTPError whose message names `node`, its module and source line, and a hint."""
    where = node_place(node)
    if rule:
        where["rule"] = rule
    return AutoTPError(f"{what}\n{describe_place(where)}", what=what, where=where, hint=hint,
                       node=node)  # fmt: skip
