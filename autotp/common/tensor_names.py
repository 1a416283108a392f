"""The names a module gives its tensors. A tied tensor (an output head tied to its
embedding, BERT's head bias under two modules) is one tensor under several names; what is
known of it by one name (its split) holds under all of them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch.nn as nn

__all__ = ["names_by_tensor", "with_every_name", "common_prefix"]

V = TypeVar("V")


def names_by_tensor(module: nn.Module, buffers: bool = True) -> dict[int, list[str]]:
    """Every name of each parameter (and buffer) of `module`, by the tensor's id, in
    `named_parameters` order: the first is the name PyTorch keeps when it deduplicates."""
    out: dict[int, list[str]] = {}
    tensors = [*module.named_parameters(remove_duplicate=False),
               *(module.named_buffers(remove_duplicate=False) if buffers else ())]  # fmt: skip
    for name, t in tensors:
        out.setdefault(id(t), []).append(name)
    return out


def with_every_name(by_name: dict[str, V], groups: Iterable[Iterable[str]]) -> dict[str, V]:
    """`by_name` (keyed by one name of each tensor) with its value under every name of
    the tensor too; `groups`: the names of each tensor."""
    out = dict(by_name)
    for names in groups:
        names = list(names)
        value = next((out[n] for n in names if n in out), None)
        if value is not None:
            out.update(dict.fromkeys(names, value))
    return out


def common_prefix(paths: Iterable[str]) -> str:
    """The longest dotted path every one of `paths` starts with ("" if none)."""
    out = []
    for level in zip(*(p.split(".") for p in paths), strict=False):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)
