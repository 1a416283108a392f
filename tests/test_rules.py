"""Each rule, in each spelling: what matched, the exact collectives that ran, a graph that
lints, and equality with serial in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autotp
from autotp.models import build
from autotp.rewrite.sites import record
from autotp.testing import assert_equivalent

B, T, C, H = 2, 5, 16, 4


class LinearGeluMLP(nn.Module):
    """nn.Linear + nn.GELU (GPT-2's spelling)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C)

    def forward(self, x):
        return x + self.c_proj(self.act(self.c_fc(x)))


class FunctionalMLP(nn.Module):
    """F.linear, the tanh formula of GELU, and x @ W + b with a [in, out] weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4 * C, C) / 4)
        self.b1 = nn.Parameter(torch.randn(4 * C))
        self.w2 = nn.Parameter(torch.randn(4 * C, C) / 8)  # [in, out]
        self.b2 = nn.Parameter(torch.randn(C))

    def forward(self, x):
        h = F.linear(x, self.w1, self.b1)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
        return x + (h @ self.w2 + self.b2)


class Conv1DMLP(nn.Module):
    """Hugging Face GPT-2's Conv1D: addmm(b, x2d, W[in, out]) with a view around it."""

    def __init__(self) -> None:
        super().__init__()
        self.w_fc = nn.Parameter(torch.randn(C, 4 * C) / 4)
        self.b_fc = nn.Parameter(torch.randn(4 * C))
        self.w_proj = nn.Parameter(torch.randn(4 * C, C) / 8)
        self.b_proj = nn.Parameter(torch.randn(C))

    def forward(self, x):
        b, t, c = x.size()
        h = torch.addmm(self.b_fc, x.view(-1, c), self.w_fc).view(b, t, -1)
        h = F.relu(h)
        y = torch.addmm(self.b_proj, h.view(-1, h.size(-1)), self.w_proj)
        return x + y.view(b, t, c)


class SeparateSdpaAttention(nn.Module):
    """Separate q/k/v, reshape with -1, permute, and F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.o = nn.Linear(C, C)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, H, -1).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, t, H, -1).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, t, H, -1).permute(0, 2, 1, 3)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.permute(0, 2, 1, 3).reshape(b, t, -1))


def _x() -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _own(m: nn.Module) -> object:
    return m.example_inputs()


def _plain(m: nn.Module) -> object:
    return (_x().requires_grad_(),)  # as inside a network: the block input has a gradient


FUSED = ["vocab_embedding", "attention_fused_qkv", "mlp", "lm_head"]
SEPARATE = ["vocab_embedding", "attention_separate_qkv", "mlp", "lm_head"]
CASES = [
    # (model factory, inputs, expected rule names in order)
    (LinearGeluMLP, _plain, ["mlp"]),
    (FunctionalMLP, _plain, ["mlp"]),
    (Conv1DMLP, _plain, ["mlp"]),
    (SeparateSdpaAttention, _plain, ["attention_separate_qkv"]),
    (lambda: build("gpt2-tiny", n_layer=1), _own, FUSED),
    (lambda: build("gpt2-tiny-flash", n_layer=1), _own, FUSED),
    (lambda: build("bert-tiny", num_hidden_layers=1), _own, SEPARATE),
]
IDS = ["linear-gelu", "functional", "conv1d", "sdpa-separate", "gpt2", "gpt2-sdpa", "bert"]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize(("factory", "inputs", "rules"), CASES, ids=IDS)
def test_rule(factory, inputs, rules, tp: int) -> None:
    torch.manual_seed(0)
    model = factory().double()
    x = inputs(model)
    plan = autotp.plan(model, tp, x)
    assert [m.rule.name for m in plan.matches] == rules
    plan.graph.lint()
    # One g after each row-split linear, one f per distinct block input: per block, one
    # all-reduce forward and one backward, counted as they run. The vocabulary adds one
    # forward all-reduce for the embedding, the loss's max and two sums, the gather of the
    # returned logits, and the output layer's f in backward.
    sim = autotp.simulate(model, tp, x)
    with autotp.count_collectives() as log:
        out = sim(**x) if isinstance(x, dict) else sim(*x)
        loss = out[1] if isinstance(out, tuple) else out.square().sum()
        loss.backward()
    blocks = sum(r in ("mlp", "attention_fused_qkv", "attention_separate_qkv") for r in rules)
    vocab = "lm_head" in rules
    assert log.count("forward", "all_reduce") == blocks + 3 * vocab
    assert log.count("forward", "all_reduce_max") == vocab
    assert log.count("forward", "all_gather") == vocab
    assert log.count("backward", "all_reduce") == blocks + vocab
    assert assert_equivalent(model, x, tp).largest() <= 1e-10


def test_shared_input_gets_one_f() -> None:
    """Q, K and V read the same input: one f, not three."""
    plan = autotp.plan(SeparateSdpaAttention(), 2, (_x(),))
    fs = [n for n in plan.graph.nodes if record(n).collective == "f"]
    assert len(fs) == 1
    assert len(fs[0].users) == 3


def test_row_bias_added_after_all_reduce() -> None:
    """the row-split layer's bias follows g, or it counts tp times."""
    plan = autotp.plan(LinearGeluMLP(), 2, (_x(),))
    (g,) = [n for n in plan.graph.nodes if record(n).collective == "g"]
    (add,) = g.users
    assert add.target.__name__ == "add"
    assert add.args[1].op == "get_attr" and add.args[1].target == "c_proj.bias"


def test_fused_qkv_is_split_by_heads_per_part() -> None:
    """rank r holds [Q_r | K_r | V_r], not a contiguous third."""
    model = build("gpt2-tiny", n_layer=1)
    sim = autotp.simulate(model, 2)
    w = model.transformer.h[0].attn.c_attn.weight
    c = model.config.n_embd
    r1 = sim.ranks[1].get_parameter("transformer.h.0.attn.c_attn.weight")
    want = torch.cat([w[c // 2 : c], w[c + c // 2 : 2 * c], w[2 * c + c // 2 :]])
    assert torch.equal(r1, want)


class FusedGateUp(torch.nn.Module):
    """Phi-3's MLP: one gate|up projection halved by chunk (or split), then SwiGLU."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(8, 32, bias=False)
        self.down_proj = torch.nn.Linear(16, 8, bias=False)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if self.spelling == "chunk":
            gate, up = h.chunk(2, dim=-1)
        else:
            gate, up = torch.split(h, 16, dim=-1)
        return x + self.down_proj(torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("spelling", ["chunk", "split"])
def test_fused_gate_up_splits_each_half(spelling: str) -> None:
    model = FusedGateUp(spelling).double()
    x = (torch.randn(2, 3, 8, dtype=torch.float64),)
    plan = autotp.plan(model, 2, x)
    assert [m.rule.name for m in plan.matches] == ["swiglu_fused"]
    assert plan.splits["gate_up_proj.weight"].parts == 2 and not plan.replicated
    for tp in (2, 4):
        assert_equivalent(model, x, tp=tp)


def test_a_plain_mlp_is_not_taken_for_a_fused_one() -> None:
    model = build("gpt2-tiny")
    names = {m.rule.name for m in autotp.plan(model, 2).matches}
    assert "swiglu_fused" not in names and "mlp" in names


def test_a_users_own_rule_as_in_the_docs() -> None:
    """docs/rules.md's worked example: a structure no shipped rule matches stays replicated;
    the user's rule splits it, propagation proves it (the mask is cut per rank), and the
    result equals serial."""
    from autotp.match.rule import Rule, column, pattern, row
    from autotp.rules import DEFAULT_RULES

    class MaskedMLP(nn.Module):
        def __init__(self, c: int = 16) -> None:
            super().__init__()
            self.fc, self.proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            return x + self.proj(F.gelu(self.fc(x)) * keep)

    masked_mlp = Rule(
        name="masked_mlp",
        patterns=(
            pattern(
                {"fc": "linear", "act": ("glue", 2), "proj": "linear"},
                [("fc", "act", None), ("act", "proj", 0)],
            ),
        ),
        split={"fc": column, "proj": row},
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    keep = (torch.rand(2, 5, 64, generator=g) > 0.1).float()
    model = MaskedMLP()
    assert not autotp.plan(model, 2, (x, keep)).matches
    rules = [*DEFAULT_RULES, masked_mlp]
    assert [m.rule.name for m in autotp.plan(model, 2, (x, keep), rules=rules).matches] == [
        "masked_mlp"
    ]
    assert_equivalent(
        model, (x, keep), 2, parallel=lambda m, tp, xs: autotp.simulate(m, tp, xs, rules=rules)
    )


def test_a_projection_added_to_the_residual_is_no_output_layer() -> None:
    """As wide as the vocabulary by coincidence, but added to the residual stream before
    the output: not an output layer (it was vocabulary-split, then gathered)."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(16, 16)
            self.proj = nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.wte(ids)
            return x + self.proj(torch.tanh(x))

    from autotp.capture.trace import trace
    from autotp.match.patterns import match
    from autotp.rules import DEFAULT_RULES

    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    gm = trace(Residual(), (ids,)).gm
    assert "lm_head" not in [m.rule.name for m in match(gm, DEFAULT_RULES)]
