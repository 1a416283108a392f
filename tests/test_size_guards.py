"""A proof that read a size holds for that size only: a call with other sizes is right
or refused by name, never silently different. Attention written fairseq-style (heads
folded into the batch, `torch.bmm`, the attention weights returned) planned at one batch
and length and called at others."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import autotp
from autotp import AutoTPError


class FoldedAttention(nn.Module):
    """Heads folded into the batch: (b * n_head, t, head_dim), as fairseq writes it."""

    def __init__(self, c: int = 16, n_head: int = 4, weights: bool = True) -> None:
        super().__init__()
        self.n_head, self.weights = n_head, weights
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor):
        b, t, c = x.shape
        hd = c // self.n_head

        def heads(y: torch.Tensor) -> torch.Tensor:  # (b * n_head, t, hd)
            return y.reshape(b, t, self.n_head, hd).transpose(1, 2).reshape(b * self.n_head, t, hd)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        w = torch.bmm(q, k.transpose(1, 2)).softmax(-1)  # (b * n_head, t, t)
        y = torch.bmm(w, v).reshape(b, self.n_head, t, hd).transpose(1, 2).reshape(b, t, c)
        return (self.o(y), w) if self.weights else self.o(y)


def _x(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 16, generator=g, dtype=torch.float64)


@given(
    tp=st.sampled_from([2, 4]),
    weights=st.booleans(),
    plan_b=st.sampled_from([1, 2, 3]),
    plan_t=st.sampled_from([1, 4]),
    calls=st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 3, 4])),
                   min_size=1, max_size=3),
)  # fmt: skip
@pytest.mark.slow
def test_calls_at_other_sizes_are_right_or_refused(tp, weights, plan_b, plan_t, calls) -> None:
    torch.manual_seed(0)
    model = FoldedAttention(weights=weights).double()
    try:
        sim = autotp.simulate(model, tp, (_x(plan_b, plan_t),))
    except AutoTPError:
        return  # refused while planning (weights split in parts cannot be returned)
    for b, t in calls:
        x = _x(b, t, seed=1)
        try:
            got = sim(x)
        except AutoTPError as e:
            assert "proven for size" in str(e)
            continue
        want = model(x)
        for a, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)), strict=True):
            assert a.shape == w.shape
            assert torch.allclose(a, w, atol=1e-10, rtol=0)


def test_batch_one_plan_refuses_batch_two_naming_the_sizes() -> None:
    torch.manual_seed(0)
    model = FoldedAttention().double()
    sim = autotp.simulate(model, 2, (_x(1, 8),))
    out, w = sim(_x(1, 8))
    assert w.shape == (4, 8, 8) and torch.allclose(out, model(_x(1, 8))[0], atol=1e-10)
    with pytest.raises(AutoTPError, match=r"proven for size 1 of dimension 0.*this call has 2"):
        sim(_x(2, 8))


def test_the_usual_attention_needs_no_guard() -> None:
    """`view(B, T, H, hd)` splits the heads at every batch and length: nothing is checked
    per call, and other sizes run."""
    from autotp.models import build
    from autotp.rewrite.guards import check_sizes

    model = build("gpt2-tiny")
    plan = autotp.plan(model, 2, model.example_inputs())
    assert not any(n.target is check_sizes for n in plan.graph.nodes)
