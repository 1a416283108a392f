"""Size guards: a proof that read a size holds only for that size.

Propagation proves where a split lands through a reshape from the value's sizes. Most
proofs hold for every batch and length (`view(B, T, H, hd)` splits H whatever B and T
are), but a reshape that merges dimensions in front of the split one reads their sizes:
attention that folds its heads into the batch (`q.reshape(b * n_head, t, hd)`) holds the
heads alone at batch 1 and batch x heads at batch 2, where a rank's heads are no longer
one contiguous run. Such a reshape records the sizes it read (`Propagation.guards`), and
the rewrite puts `check_sizes` after it: a call with other sizes is refused, naming them,
instead of computing something else.
"""

from __future__ import annotations

import torch

from ..common.errors import AutoTPError

__all__ = ["check_sizes"]


def check_sizes(
    x: torch.Tensor,
    y: torch.Tensor,
    src: tuple[tuple[int, int], ...],
    dst: tuple[tuple[int, int], ...],
    where: str,
) -> None:
    """Refuse unless `x` and `y` have the sizes (dim, size) the plan was proven for."""
    for t, facts, what in ((x, src, "input"), (y, dst, "output")):
        for dim, size in facts:
            if t.shape[dim] != size:
                _refuse(where, what, tuple(t.shape), dim, size)


# torch.compiler.disable is unannotated in torch: the decorated function keeps its signature
@torch.compiler.disable(  # type: ignore[misc, no-untyped-call]
    reason="autotp: a call with sizes the plan was not proven for"
)
def _refuse(where: str, what: str, shape: tuple[int, ...], dim: int, size: int) -> None:
    what_ = (
        f"a reshape's split was proven for size {size} of dimension {dim} of its {what}, "
        f"and this call has {shape[dim]} (local shape {shape}): at other sizes the split "
        "lands elsewhere (e.g. heads folded into the batch)"
    )
    hint = (
        "plan with example inputs of the sizes you call with (a batch and a length above 1 "
        "prove the general case where it holds), or keep the sizes fixed"
    )
    raise AutoTPError(f"{what_}\n{where}", what=what_, hint=hint)
