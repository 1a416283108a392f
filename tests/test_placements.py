"""The placement algebra: partial values (P) and one redistribution step.

Properties: a parallel attention + MLP block (GPT-J, Falcon, NeoX) costs one all-reduce
forward and one backward, however the sum with the residual is spelled; a partial value
read whole anywhere gets its sum first, and stays exact; `x @ W.T` in every spelling is a
linear; per-head replicated values (ALiBi slopes, a per-head mask or scale) are cut to the
rank's heads. Every model equals serial in float64 through both front-ends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode

import autotp
from autotp.runtime.collectives import rank_slice
from autotp.testing import assert_equivalent, run_on_gloo

C, H = 16, 4


def _x(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randn(
        batch, seq, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )


def _equal(model: nn.Module, x: torch.Tensor, tp: int, frontend: str) -> None:
    assert_equivalent(
        model, (x,), tp, parallel=lambda m, t, xs: autotp.simulate(m, t, xs, frontend=frontend)
    )


class FalconLinear(nn.Linear):
    """Falcon's spelling: `x @ W.T`, the bias added by its own op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class ParallelBlock(nn.Module):
    """Attention and MLP read one layer norm; their outputs and the residual are summed."""

    def __init__(self, order: str = "gptj", linear: type[nn.Linear] = FalconLinear) -> None:
        super().__init__()
        self.order = order
        self.ln = nn.LayerNorm(C)
        self.qkv = linear(C, 3 * C, bias=False)
        self.dense = linear(C, C, bias=False)
        self.up, self.down = linear(C, 4 * C), linear(4 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.ln(x)
        q, k, v = self.qkv(h).split(C, 2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = self.dense(a.transpose(1, 2).reshape(B, T, C))
        m = self.down(F.gelu(self.up(h)))
        if self.order == "gptj":  # attn_output + feed_forward_hidden_states + residual
            return a + m + x
        if self.order == "residual_first":  # x + attn + mlp
            return x + a + m
        mlp = m  # Falcon: mlp_output += attention_output; output = mlp_output + residual
        return (mlp + a) + x


def _forward_backward_counts(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    with autotp.count_collectives() as log:
        module(x).sum().backward()
    return log.count("forward", "all_reduce"), log.count("backward", "all_reduce")


@pytest.mark.parametrize("order", ["gptj", "residual_first", "falcon"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_parallel_block_costs_one_all_reduce_each_way(order: str, frontend: str) -> None:
    model = ParallelBlock(order).double()
    for tp in (2, 4):
        _equal(model, _x(), tp, frontend)
    sim = autotp.simulate(model, 2, (_x(),), frontend=frontend)
    assert _forward_backward_counts(sim, _x()) == (1, 1)
    plan = autotp.plan(model, 2, (_x(),), frontend=frontend)
    assert [m.rule.name for m in plan.matches] == ["attention_fused_qkv", "mlp"]
    assert plan.collectives()["g"] == 1


def _one_block_under_comm_debug_mode(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = ParallelBlock().double()
    module = autotp.parallelize(model, world, (_x(),))
    with CommDebugMode() as cdm:  # an input that needs a gradient, as inside a model
        module(_x().requires_grad_()).sum().backward()
    return {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}


def test_comm_debug_mode_counts_one_all_reduce_each_way_on_gloo() -> None:
    counts = run_on_gloo(_one_block_under_comm_debug_mode, 2)
    assert counts[0] == counts[1] == {"allreduce_": 2}


class Reused(nn.Module):
    """A row-split output read twice: summed with another partial and read whole."""

    def __init__(self) -> None:
        super().__init__()
        self.up1, self.down1 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        self.up2, self.down2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.down1(F.relu(self.up1(x)))
        q = self.down2(F.relu(self.up2(x)))
        both = p + q
        return x + both * 2 + p.tanh()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_partial_value_read_whole_and_summed_stays_exact(frontend: str) -> None:
    for tp in (2, 4):
        _equal(Reused().double(), _x(), tp, frontend)


@pytest.mark.parametrize(
    "spelling", ["x @ w.T", "x @ w.t()", "torch.matmul(x, w.mT)", "x @ w.transpose(0, 1)",
                 "x @ torch.t(w)", "x @ w.permute(1, 0)"],
)  # fmt: skip
def test_x_at_w_transposed_is_a_linear_in_every_spelling(spelling: str) -> None:
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4 * C, C) / 4)
            self.w2 = nn.Parameter(torch.randn(C, 4 * C) / 8)

        def lin(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return eval(spelling, {"torch": torch, "x": x, "w": w})  # noqa: S307

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.lin(F.gelu(self.lin(x, self.w1)), self.w2)

    model = MLP().double()
    plan = autotp.plan(model, 2, (_x(),), frontend="fx")
    assert [m.rule.name for m in plan.matches] == ["mlp"], plan.unmatched
    for frontend in ("fx", "export"):
        _equal(model, _x(), 2, frontend)


class PerHead(nn.Module):
    """ALiBi slopes as a buffer, a per-head scale parameter reached through a view, and a
    per-head mask: replicated values the split scores meet along the heads."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.register_buffer("slopes", torch.tensor([2.0 ** (-(i + 1)) for i in range(H)]))
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(C, 2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        pos = torch.arange(T, device=x.device)
        alibi = self.slopes.view(1, H, 1, 1).to(x.dtype) * (pos.view(1, T) - pos.view(T, 1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(C // H) * self.scale.view(1, H, 1, 1)
            y = (att + alibi).softmax(-1) @ v
        return x + self.o(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("sdpa", [False, True])
def test_per_head_replicated_values_are_cut_to_the_ranks_heads(sdpa: bool) -> None:
    model = PerHead(sdpa).double()
    plan = autotp.plan(model, 2, (_x(),))
    assert [m.rule.name for m in plan.matches] == ["attention_fused_qkv"]
    assert not plan.replicated
    for frontend in ("fx", "export"):
        for tp in (2, 4):
            _equal(model, _x(), tp, frontend)


def test_rank_slice_is_the_ranks_slice_of_every_part() -> None:
    x = torch.arange(2 * 12 * 3.0).view(2, 12, 3)
    for parts, tp in ((1, 2), (1, 4), (3, 2), (2, 3)):
        for rank in range(tp):
            want = torch.cat([b.chunk(tp, 1)[rank] for b in x.chunk(parts, 1)], 1)
            got = rank_slice(x, 1, parts, tp, torch.tensor(rank))
            assert torch.equal(got, want)


class FrozenMLP(nn.Module):
    """A row-split output computed under no_grad and added to the residual outside it: its
    bias is added inside the region, as in serial, so it gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            m = self.down(F.silu(self.up(x)))
        return x + m


def test_a_partial_value_is_summed_in_the_grad_mode_it_was_computed_in() -> None:
    model = FrozenMLP().double()
    sim = autotp.simulate(model, 2, (_x(),))
    sim(_x().requires_grad_()).sum().backward()
    assert all(g is None for g in autotp.full_grads(sim).values())
    _equal(model, _x(), 2, "fx")


class LogitsBias(nn.Module):
    """BART's `lm_logits = lm_head(x) + final_logits_bias` (a buffer over the vocabulary),
    or the same bias as a parameter, on vocabulary-split logits."""

    def __init__(self, parameter: bool, vocab: int = 37) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, C)
        self.up, self.down = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        self.head = nn.Linear(C, vocab, bias=False)
        bias = 0.1 * torch.randn(1, vocab)
        if parameter:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple:
        x = self.wte(ids)
        x = x + self.down(F.gelu(self.up(x)))
        logits = self.head(x) + self.bias
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))
        return loss, logits


@pytest.mark.parametrize("parameter", [False, True])
def test_a_bias_added_to_vocabulary_split_logits(parameter: bool) -> None:
    model = LogitsBias(parameter).double()
    g = torch.Generator().manual_seed(0)
    ids, labels = (
        torch.randint(0, 37, (2, 5), generator=g),
        torch.randint(0, 37, (2, 5), generator=g),
    )
    plan = autotp.plan(model, 2, (ids, labels))
    assert "lm_head" in [m.rule.name for m in plan.matches] and not plan.replicated
    for tp in (2, 4):
        assert_equivalent(model, (ids, labels), tp)


class InPlace(nn.Module):
    """In-place ops on split activations (MPNet's `scores.add_(bias)`, `h += 1`)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.up, self.down = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(C, 2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1)
        scores.add_(bias)  # a per-head bias [1, H, T, T]: cut to the rank's heads
        x = x + self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
        h = self.up(x)
        h += 1.0
        h.mul_(0.5)
        return x + self.down(F.relu(h))


def test_in_place_ops_on_split_activations() -> None:
    x, bias = _x(), torch.randn(1, H, 5, 5, dtype=torch.float64)
    plan = autotp.plan(InPlace().double(), 2, (x, bias))
    assert [m.rule.name for m in plan.matches] == ["attention_fused_qkv", "mlp"]
    for tp in (2, 4):
        assert_equivalent(InPlace().double(), (x, bias), tp)


class InPlaceWidens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.up(x))
        full = x.repeat(1, 1, 2)
        full.add_(h)  # a replicated value taking a split one in place
        return x + self.down(full)


def test_an_in_place_op_that_would_change_placement_is_refused() -> None:
    from autotp.capture.trace import trace
    from autotp.match.patterns import find_linears
    from autotp.match.rule import Column, Row
    from autotp.sharding import propagate

    gm = trace(InPlaceWidens().double(), (_x(),)).gm
    linears = find_linears(gm)
    up, down = sorted(linears, key=lambda n: n.name != "up")
    splits = {up: (Column(), linears[up]), down: (Row(), linears[down])}
    with pytest.raises(autotp.AutoTPError, match="in-place add_ would make"):
        propagate(gm, 2, linears, splits)


class InPlaceSums(nn.Module):
    """Falcon's `mlp_output += attention_output` (nothing reads mlp_output again: one
    all-reduce for both), and `m.add_(x)` followed by a read of m (the change must be
    seen there: that block stays replicated)."""

    def __init__(self, reread: bool) -> None:
        super().__init__()
        self.reread = reread
        self.a1, self.a2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        self.m1, self.m2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a2(F.relu(self.a1(x)))
        m = self.m2(F.gelu(self.m1(x)))
        if self.reread:
            m.add_(x)
            return m * 2.0 + a
        m += a
        return m + x


@pytest.mark.parametrize("reread", [False, True])
def test_in_place_sums_of_partial_values(reread: bool) -> None:
    model = InPlaceSums(reread).double()
    plan = autotp.plan(model, 2, (_x(),))
    if reread:
        assert [m.rule.name for m in plan.matches] == ["mlp"]
        assert "in-place" in plan.replicated[0][1]
    else:
        assert [m.rule.name for m in plan.matches] == ["mlp", "mlp"]
        assert plan.collectives()["g"] == 1
    for frontend in ("fx", "export"):
        _equal(model, _x(), 2, frontend)


class FewKVHeads(nn.Module):
    """Grouped-query attention with `kv` key/value heads for 8 query heads: `enable_gqa`,
    or the key/value heads repeated by expand + reshape before a plain attention."""

    def __init__(self, gqa: bool, kv: int = 2) -> None:
        super().__init__()
        self.gqa, self.kv = gqa, kv
        self.q, self.o = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.k, self.v = nn.Linear(C, C // 8 * kv, bias=False), nn.Linear(C, C // 8 * kv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hs, rep = C // 8, 8 // self.kv
        q = self.q(x).view(B, T, 8, hs).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, hs).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, hs).transpose(1, 2)
        if not self.gqa:
            k = k[:, :, None].expand(B, self.kv, rep, T, hs).reshape(B, 8, T, hs)
            v = v[:, :, None].expand(B, self.kv, rep, T, hs).reshape(B, 8, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return x + self.o(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("gqa", [False, True])
def test_fewer_key_value_heads_than_ranks_are_held_by_the_ranks_that_read_them(
    gqa: bool,
) -> None:  # fmt: skip
    """2 key/value heads at tp 4 and 8: K and V are cut into 2 slices, each held by the
    tp / 2 ranks whose query heads read it (repeated heads cut further on each rank); the
    ranks holding a slice sum their weight gradients in one all-reduce, so after a step
    they hold the same weights, which are the serial ones."""
    model = FewKVHeads(gqa).double()
    for tp in (4, 8):
        for frontend in ("fx", "export"):
            _equal(model, _x(), tp, frontend)
        plan = autotp.plan(model, tp, (_x(),))
        assert [sorted(m.layers) for m in plan.matches] == [["k", "out", "q", "v"]]
        assert not plan.replicated
        for name in ("k.weight", "v.weight", "v.bias"):
            assert plan.splits[name].replicas == tp // 2 and plan.splits[name].slices(tp) == 2
        coll = plan.collectives()
        assert (coll["f"], coll["g"]) == (2, 1)  # f: x; K's and V's gradients, as one
    sim = autotp.simulate(model, 4, (_x(),))
    torch.optim.SGD(sim.parameters(), lr=0.1).zero_grad()
    sim(_x()).square().sum().backward()
    torch.optim.SGD(sim.parameters(), lr=0.1).step()
    k = [dict(r.named_parameters())["k.weight"] for r in sim.ranks]
    assert torch.equal(k[0].grad, k[1].grad) and torch.equal(k[2].grad, k[3].grad)
    assert torch.equal(k[0], k[1]) and not torch.equal(k[1], k[2])
    with pytest.raises(autotp.AutoTPError, match="would move elements"):
        autotp.plan(model, 4, (_x(),), strict=True)


@pytest.mark.parametrize("gqa", [False, True])
def test_one_key_value_head_stays_whole(gqa: bool) -> None:
    """Multi-query attention (one key/value head) has nothing to cut: K and V stay
    replicated (Megatron's choice), with the reason; Q and the output projection split,
    and each rank reads the key/value heads its query heads use."""
    model = FewKVHeads(gqa, kv=1).double()
    for tp in (2, 4):
        for frontend in ("fx", "export"):
            _equal(model, _x(), tp, frontend)
        plan = autotp.plan(model, tp, (_x(),))
        assert [sorted(m.layers) for m in plan.matches] == [["out", "q"]]
        assert [sorted(m.layers) for m, _ in plan.replicated] == [["k", "v"]]
        assert "k(" in plan.replicated[0][1] or "attention" in plan.replicated[0][1]
        coll = plan.collectives()
        assert (coll["f"], coll["g"]) == (3, 1)  # f: x for q; k and v for their cuts


class FusedQKV(nn.Module):
    """One fused Q|K|V projection, read two ways: sliced into parts of unequal widths
    (Phi-3, 8 query heads and 4 key/value heads), or viewed as (B, T, 3, H, hd) and
    unbound (ModernBERT)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        kv = C // 2 if how == "sliced" else C
        self.qkv, self.o = nn.Linear(C, C + 2 * kv), nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hs, qkv = C // 8, self.qkv(x)
        if self.how == "sliced":
            q = qkv[..., :C].view(B, T, 8, hs).transpose(1, 2)
            k = qkv[..., C : C + C // 2].view(B, T, 4, hs).transpose(1, 2)
            v = qkv[:, :, C + C // 2 :].view(B, T, 4, hs).transpose(1, 2)
        else:
            q, k, v = qkv.view(B, T, 3, 8, hs).transpose(1, 3).unbind(dim=2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("how", ["sliced", "unbind"])
def test_fused_qkv_sliced_into_unequal_parts_or_unbound(how: str) -> None:
    """Each part split by heads, the slices' bounds made local: rank r reads
    qkv_r[..., :C/tp], [C/tp : 1.5C/tp], [1.5C/tp:]."""
    model = FusedQKV(how).double()
    for tp in (2, 4):
        for frontend in ("fx", "export"):
            _equal(model, _x(), tp, frontend)
        plan = autotp.plan(model, tp, (_x(),))
        rule = "attention_sliced_qkv" if how == "sliced" else "attention_fused_qkv"
        assert [m.rule.name for m in plan.matches] == [rule] and not plan.replicated
    if how == "sliced":
        assert str(plan.splits["qkv.weight"]) == "S(0 in parts 16|8|8)"
        edits = sorted((e.old, e.new) for e in plan.propagation.edits if e.node.op != "get_attr")
        assert (16, 4) in edits and (24, 6) in edits  # slice bounds C and 1.5 C, at tp=4


class QKNorm(nn.Module):
    """Attention whose queries and keys are RMS-normalised over all their heads' features
    (OLMo 2's q_norm/k_norm), in the model's own dtype: a mean over the split features."""

    def __init__(self, kv: int = 8) -> None:
        super().__init__()
        self.kv = kv
        self.q, self.o = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.k, self.v = nn.Linear(C, C // 8 * kv, bias=False), nn.Linear(C, C // 8 * kv)
        self.q_w = nn.Parameter(torch.rand(C) + 0.5)
        self.k_w = nn.Parameter(torch.rand(C // 8 * kv) + 0.5)

    @staticmethod
    def _norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hs = C // 8
        q = self._norm(self.q(x), self.q_w).view(B, T, 8, hs).transpose(1, 2)
        k = self._norm(self.k(x), self.k_w).view(B, T, self.kv, hs).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv < 8)
        return x + self.o(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("kv", [8, 2])
def test_a_norm_over_all_heads_sums_its_slices_means(kv: int) -> None:
    """A mean over the split features is each rank's mean of its slice / tp, summed by one
    all-reduce (keys held by several ranks count once each); the attention is split, not
    left replicated, and equals serial in float64 at tp 2 and 4, gradients included."""
    model = QKNorm(kv).double()
    for tp in (2, 4):
        plan = autotp.plan(model, tp, (_x(),))
        assert not plan.replicated and [m.rule.name for m in plan.matches] == [
            "attention_separate_qkv"]  # fmt: skip
        assert plan.collectives()["g"] == 1 + 2  # the output projection's, and a norm's each
        for frontend in ("fx", "export"):
            _equal(model, _x(), tp, frontend)


class CenteredMLP(nn.Module):
    """An MLP whose hidden activations are centred on their mean over everything: the
    mean's sum is read back by the split activations, so its gradient is each rank's
    part of a sum (found by the fuzzer: `h - h.mean(dim=())`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return x + self.proj(h - h.mean(dim=()))


def test_a_mean_over_everything_read_by_the_split_activations_gets_its_gradient_summed() -> None:
    model = CenteredMLP().double()
    for tp in (2, 4):
        plan = autotp.plan(model, tp, (_x(),))
        assert not plan.replicated
        assert plan.collectives()["g"] == 2  # the mean's sum, the output projection's
        for frontend in ("fx", "export"):
            _equal(model, _x(), tp, frontend)


class SummedMLP(nn.Module):
    """A sum over the split hidden features added to the output (the fuzzer's
    `aux = h.sum(-1, keepdim=True)`): each rank's sum of its slice is its summand."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return x + self.proj(h) + h.sum(-1, keepdim=True)


def test_a_sum_over_the_split_features_is_the_sum_of_the_slices_sums() -> None:
    model = SummedMLP().double()
    for tp in (2, 4):
        assert not autotp.plan(model, tp, (_x(),)).replicated
        for frontend in ("fx", "export"):
            _equal(model, _x(), tp, frontend)
