"""transformers' checkpoint key conversion, read from transformers itself: a model whose
tensors are stored under other names than its state_dict's (Mixtral's experts are one
fused tensor in the model, one tensor per expert in what `save_pretrained` writes, under
`block_sparse_moe` where the model says `mlp`) is read as `from_pretrained` reads it.

`Conversions.of(model)` takes the model's mapping (`get_model_conversion_mapping`):
renamings whose patterns are plain names, and converters made of the operations
`MergeModulelist` (stack a list of tensors, one per expert) and `Concatenate` (join those
stacks, e.g. gate and up). `source(name, keys)` says where a model tensor comes from in
a file holding `keys`; `build` makes it whole from the file's tensors, one tensor at a
time. A mapping with other operations is refused by name when a tensor needs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from ..common.errors import AutoTPError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["Conversions", "Source"]

_PLAIN = re.compile(r"^[\w.]+$")


@dataclass(frozen=True)
class Source:
    """A model tensor made from a file's tensors: `groups[i]` lists the file names of
    the i-th source pattern in order (one per expert), combined by `ops`."""

    target: str
    groups: tuple[tuple[str, ...], ...]
    ops: tuple[tuple[str, int], ...]  # ("merge", dim) / ("concat", dim), in order

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        parts: list[Any] = [[read(n) for n in group] for group in self.groups]
        for op, dim in self.ops:
            if op == "merge":
                parts = [torch.stack(group, dim=dim) for group in parts]
            else:
                parts = [torch.cat(parts, dim=dim)]
        if len(parts) != 1 or not isinstance(parts[0], torch.Tensor):
            raise AutoTPError(f"{self.target}: its conversion does not end in one tensor")
        return parts[0]


class Conversions:
    """The renamings and converters of one model class (see the module)."""

    def __init__(self, renames: list[tuple[str, str]], converters: list[Any]) -> None:
        self.renames = renames  # (in the file, in the model)
        self.converters = converters

    @classmethod
    def of(cls, model: object) -> Conversions | None:
        """The model's conversion mapping, or None (not a transformers model, or none)."""
        if not type(model).__module__.startswith("transformers."):
            return None
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
        except ImportError:
            return None
        try:
            mapping = get_model_conversion_mapping(cast("PreTrainedModel", model))
        except Exception:  # noqa: BLE001 - a model transformers cannot map: names as they are
            return None
        renames, converters = [], []
        for m in mapping or ():
            kind = type(m).__name__
            sources, targets = list(m.source_patterns), list(m.target_patterns)
            if kind == "WeightRenaming" and len(sources) == len(targets):
                renames += [(s, t) for s, t in zip(sources, targets, strict=True)
                            if _PLAIN.match(s) and _PLAIN.match(t)]  # fmt: skip
            elif kind == "WeightConverter" and len(targets) == 1:
                converters.append(m)
        return cls(renames, converters) if renames or converters else None

    def names(self, name: str) -> list[str]:
        """`name` and what the renamings would have called it in a file."""
        out = [name]
        for src, tgt in self.renames:
            out += [n.replace(tgt, src) for n in out if tgt in n]
        return list(dict.fromkeys(out))

    def source(self, name: str, keys: Collection[str]) -> Source | None:
        """How to make model tensor `name` from a file holding `keys`, or None."""
        for candidate in self.names(name):
            for conv in self.converters:
                target = conv.target_patterns[0]
                if not _PLAIN.match(target) or not candidate.endswith(target):
                    continue
                head = candidate[: -len(target)]
                groups = []
                for pattern in conv.source_patterns:
                    rx = re.compile(
                        re.escape(head) + re.escape(pattern).replace(r"\*", r"(\d+)") + "$"
                    )
                    found = sorted((int(m.group(1)), k) for k in keys if (m := rx.match(k)))
                    groups.append(tuple(k for _, k in found))
                if not all(groups):
                    continue
                return Source(name, tuple(groups), _ops(conv, name))
        return None


def _ops(conv: Any, name: str) -> tuple[tuple[str, int], ...]:
    out = []
    for op in conv.operations:
        kind = type(op).__name__
        if kind == "MergeModulelist":
            out.append(("merge", int(op.dim)))
        elif kind == "Concatenate" and getattr(op, "num_shards_attribute", None) is None:
            out.append(("concat", int(op.dim)))
        else:
            raise AutoTPError(
                f"{name} is stored converted by transformers' {kind}, which autotp does not read",
                hint="load the model with from_pretrained and pass it with its "
                "weights (no weights=), or save it with autotp.full_state_dict",
            )
    return tuple(out)
