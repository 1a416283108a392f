"""Linear layers that are not spelled as linears: a kernel-1 Conv1d over channels, and
routed experts (`bmm(W[ids], x)` with W [experts, out, in], as transformers' MoE models
compute them).

Properties: each is found as a linear, matched by the MLP rules like any other, split
along its features (the experts along each expert's hidden features, the router
replicated) with Megatron's communication (the experts' outputs combined before their
one all-reduce), and equal to serial in float64 through both
front-ends; a conv that is not a linear (kernel 3) is never split."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autotp
from autotp.rewrite.sites import record
from autotp.testing import assert_equivalent

C, HIDDEN, EXPERTS, TOP_K = 8, 16, 4, 2


class ConvMLP(nn.Module):
    """A position-wise feed-forward block over [batch, channels, length] (as in
    speech and TTS models), spelled with modules or with F.conv1d."""

    def __init__(self, functional: bool, kernel: int = 1) -> None:
        super().__init__()
        self.functional = functional
        self.up = nn.Conv1d(C, HIDDEN, kernel, padding=kernel // 2)
        self.down = nn.Conv1d(HIDDEN, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = F.conv1d(x, self.up.weight, self.up.bias, padding=self.up.padding)
            return x + F.conv1d(F.gelu(h), self.down.weight, self.down.bias)
        return x + self.down(F.gelu(self.up(x)))


class RoutedExperts(nn.Module):
    """Top-k routed experts with a fused gate|up projection per expert, computed as
    transformers' batched_mm does: each token's copy through its expert's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(C, EXPERTS, bias=False)
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * HIDDEN, C) / C**0.5)
        self.down = nn.Parameter(torch.randn(EXPERTS, C, HIDDEN) / HIDDEN**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = x.reshape(B * T, C)
        weights, ids = self.router(h).softmax(-1).topk(TOP_K, dim=-1)
        ids = ids.reshape(-1)
        tokens = h.repeat_interleave(TOP_K, dim=0)
        gate_up = torch.bmm(self.gate_up[ids], tokens.unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.bmm(self.down[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        y = (y * weights.reshape(-1, 1)).view(B * T, TOP_K, C).sum(dim=1)
        return x + y.view(B, T, C)


def _x(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("functional", [False, True])
def test_a_kernel_one_conv_is_a_linear_over_channels(functional: bool) -> None:
    model = ConvMLP(functional).double()
    x = _x((2, C, 5))
    for tp in (2, 4):
        for frontend in ("fx", "export"):
            assert_equivalent(
                model, (x,), tp, parallel=lambda m, t, xs, fe=frontend: autotp.simulate(
                    m, t, xs, frontend=fe
                ),
            )  # fmt: skip
    plan = autotp.plan(model, 2, (x,))
    assert [(m.rule.name, sorted(m.layers)) for m in plan.matches] == [("mlp", ["fc", "proj"])]
    coll = plan.collectives()
    assert (coll["f"], coll["g"]) == (1, 1)


def test_a_conv_with_a_wider_kernel_is_not_split() -> None:
    plan = autotp.plan(ConvMLP(False, kernel=3).double(), 2, (_x((2, C, 5)),), strict=False)
    assert not plan.matches or all("up" not in m.layers for m in plan.matches)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_routed_experts_split_along_each_experts_hidden_features(frontend: str) -> None:
    model = RoutedExperts().double()
    x = _x((2, 5, C))
    for tp in (2, 4):
        assert_equivalent(
            model, (x,), tp, parallel=lambda m, t, xs: autotp.simulate(m, t, xs, frontend=frontend)
        )
    plan = autotp.plan(model, 2, (x,), frontend=frontend)
    assert [(m.rule.name, sorted(m.layers)) for m in plan.matches] == [
        ("swiglu_fused", ["down", "gate_up"])
    ]
    assert plan.splits["gate_up"].dim == 1 and plan.splits["down"].dim == 2
    assert [li.weight for li in plan.unmatched] == ["router.weight"]
    coll = plan.collectives()
    assert (coll["f"], coll["g"]) == (2, 1)  # f: the tokens and the routing weights
    # the experts' partial outputs are weighted and combined before their one all-reduce,
    # which moves a token's hidden state once, not once per expert it was routed to
    (g,) = [n for n in plan.graph.nodes if record(n).collective == "g"]
    assert tuple(g.meta["val"].shape) == (2, 5, C)
