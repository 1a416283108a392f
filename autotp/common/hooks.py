"""A module's own hooks, named once: the dicts nn.Module keeps them in, what each holds,
and the one scan every stage makes of them (planning refuses or keeps them, the plan
cache will not store a model with one, the region form carries a region's own to its
parallel region, annotation never memoises a hooked module)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch.nn as nn

__all__ = ["HOOKS", "HOOK_DICTS", "HOOK_FLAGS", "hooks_of", "has_hooks"]

# the dicts of hooks nn.Module calls, and what a hook in each is
HOOKS: dict[str, str] = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}
# every dict a module keeps about its hooks: the hooks, and how some are called (with the
# call's keywords, even when the forward raised)
HOOK_DICTS: tuple[str, ...] = (
    *HOOKS,
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
HOOK_FLAGS: tuple[str, ...] = ("_is_full_backward_hook",)  # which backward hooks it calls


def hooks_of(
    module: nn.Module, ignore: Callable[[Any], bool] = lambda hook: False
) -> Iterator[tuple[str, str, Any]]:
    """(dict name, what it is, hook) for every hook `module` itself holds, but those
    `ignore` says are not the model's (transformers' output collectors, say)."""
    for attr, what in HOOKS.items():
        for hook in getattr(module, attr, {}).values():
            if not ignore(hook):
                yield attr, what, hook


def has_hooks(module: nn.Module, ignore: Callable[[Any], bool] = lambda hook: False) -> bool:
    """Does `module` itself hold a hook (not counting those `ignore` says)?"""
    return next(hooks_of(module, ignore), None) is not None
