"""PyTorch's tools around a call are not the model's: tracing and planning set them aside.

`CommDebugMode`, `torch.profiler`'s module tracking, FSDP's and a user's *global* module
hooks (`torch.nn.modules.module.register_module_forward_hook` and its kin) fire for every
module that runs, the ones torch.export runs while it traces a region too. Traced, they
would become part of the model (a full backward hook's `BackwardHookFunction`, which
export cannot keep), and their bookkeeping would count modules that never run. While a
model is traced or planned, the global hooks are emptied and restored after, and the
dispatch modes on the stack (CommDebugMode counts through one) are left aside; the calls
of the parallel module itself, and the collectives it runs, are still seen by all of
them. Hooks registered on the model's own modules are the model's: the plan keeps or
refuses those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.modules.module as module_mod
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["tools_aside"]

_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


@contextlib.contextmanager
def tools_aside() -> Iterator[None]:
    """Run the body with no global module hooks and no dispatch mode active."""
    saved = {name: dict(getattr(module_mod, name)) for name in _GLOBAL_HOOKS}
    full = module_mod._global_is_full_backward_hook
    for name in _GLOBAL_HOOKS:
        getattr(module_mod, name).clear()
    module_mod._global_is_full_backward_hook = None
    try:
        with _disable_current_modes():
            yield
    finally:
        for name, hooks in saved.items():
            getattr(module_mod, name).clear()
            getattr(module_mod, name).update(hooks)
        module_mod._global_is_full_backward_hook = full
