"""The vocabulary-parallel pieces the rewrite inserts: the split embedding lookup and the
vocab-parallel cross-entropy, as plain functions of one rank's values.

Each rank holds a slice of the (padded) vocabulary: rows [rank*n, (rank+1)*n) where n is
the local size. `rank` is a 0-dim tensor buffer (`tp_rank`), so the graph is the same on
every rank. Between these functions the graph holds the collectives:

    m  = tp_max(vocab_row_max(logits, rank, V))         # all-reduce max, [N]
    t, s = vocab_ce_terms(logits, m, target, rank, V)   # target logit, sum of exp, [N] each
    t, s = tp_g(t), tp_g(s)                             # all-reduce sum, identity backward
    loss = vocab_ce_reduce(s, t, target, ...)           # log(s) - t, then the reduction

so only batch x seq numbers cross the wire and the logits are never gathered. Columns past
the real vocabulary (padding) are -inf: they never win the max or add to the sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["vocab_embedding", "vocab_row_max", "vocab_ce_terms", "vocab_ce_reduce"]


def _local_range(n: int, rank: torch.Tensor) -> torch.Tensor:
    return rank * n


def vocab_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    rank: torch.Tensor,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """This rank's partial lookup: rows for the ids in its slice, zeros for the others.
    The sum over ranks (g) is the serial lookup. As in nn.Embedding, the `padding_idx`
    row is read like any other but receives no gradient."""
    n = weight.shape[0]
    local = ids - _local_range(n, rank)
    outside = (local < 0) | (local >= n)
    rows = F.embedding(local.masked_fill(outside, 0), weight)
    if padding_idx is not None:
        rows = torch.where((ids == padding_idx).unsqueeze(-1), rows.detach(), rows)
    return rows.masked_fill(outside.unsqueeze(-1), 0.0)


def _real_columns(logits: torch.Tensor, rank: torch.Tensor, vocab: int) -> torch.Tensor:
    n = logits.shape[-1]
    cols = torch.arange(n, device=logits.device) + _local_range(n, rank)
    return cols < vocab


def vocab_row_max(logits: torch.Tensor, rank: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """The largest real logit of each row in this rank's slice (no gradient: the loss does
    not depend on the shift). `vocab` None: no rank holds padding columns."""
    logits = logits.detach()
    if vocab is not None:
        logits = logits.masked_fill(~_real_columns(logits, rank, vocab), float("-inf"))
    return logits.amax(dim=-1)


class _CETerms(torch.autograd.Function):
    """The two per-row terms, with a backward of one pass over the logits as in
    Megatron-LM's fused vocab-parallel cross-entropy: d/dz of `sum exp(z)` is `exp(z)`,
    kept from the forward, and the target logit's gradient is one scatter."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        row_max: torch.Tensor,
        target: torch.Tensor,
        rank: torch.Tensor,
        vocab: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[-1]
        z = logits - row_max.unsqueeze(-1)
        if vocab is not None:
            z.masked_fill_(~_real_columns(logits, rank, vocab), float("-inf"))
        local = target - _local_range(n, rank)
        inside = (local >= 0) & (local < n)
        local = local.clamp(0, n - 1).unsqueeze(-1)
        picked = z.gather(-1, local).squeeze(-1)
        target_logit = torch.where(inside, picked, torch.zeros_like(picked))
        exp = z.exp_()  # z is not needed again; its exponentials are what backward needs
        sum_exp = exp.sum(dim=-1)
        ctx.save_for_backward(exp, local, inside, sum_exp)
        return target_logit, sum_exp

    # torch types backward as (ctx, *grad_outputs)
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_t: torch.Tensor, grad_s: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        saved: tuple[torch.Tensor, ...] = ctx.saved_tensors
        exp, local, inside, sum_exp = saved
        grad_t = torch.where(inside, grad_t, torch.zeros_like(grad_t))
        grad: torch.Tensor | None = None
        grad_max: torch.Tensor | None = None
        if ctx.needs_input_grad[0]:
            grad = exp * grad_s.unsqueeze(-1)
            grad.scatter_add_(-1, local, grad_t.unsqueeze(-1))
        if ctx.needs_input_grad[1]:  # z = logits - m: dz/dm is -1 in every column
            grad_max = -(grad_t + grad_s * sum_exp)
        return grad, grad_max, None, None, None


def vocab_ce_terms(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    target: torch.Tensor,
    rank: torch.Tensor,
    vocab: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the target logit (0 unless the target is in its slice) and of
    the sum of exponentials, both shifted by the global row max. `vocab` None: no rank
    holds padding columns, so none is masked."""
    # torch leaves Function.apply unannotated
    out: tuple[torch.Tensor, torch.Tensor] = _CETerms.apply(  # type: ignore[no-untyped-call]
        logits, row_max, target, rank, vocab
    )
    return out


def vocab_ce_reduce(
    sum_exp: torch.Tensor,
    target_logit: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """-log softmax at the target from the reduced terms, then F.cross_entropy's reduction
    (ignored targets count zero and are left out of the mean)."""
    keep = target != ignore_index
    loss = torch.where(keep, sum_exp.log() - target_logit, torch.zeros_like(target_logit))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()
