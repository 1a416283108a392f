"""Equal to serial, or refused: what tracing drops is kept or refused, unknown uses of a
split value are refused, model state (ties, per-module modes) is read from the model.

Each model here is small and written in a style the reference models do not use; each
test states which way it must go: `assert_equivalent` (float64: outputs, loss, every
parameter and input gradient, weights after a step) or an AutoTPError naming the cause.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autotp
from autotp.capture.trace import trace
from autotp.match.patterns import find_linears
from autotp.match.rule import Split, column, row
from autotp.sharding import Propagation, propagate
from autotp.testing import assert_equivalent


def _x(b: int = 2, t: int = 3, c: int = 8) -> torch.Tensor:
    return torch.randn(b, t, c, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    """The plain column -> gelu -> row structure the rules split."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(c, 4 * c)
        self.proj = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def _refused(model: nn.Module, *inputs: torch.Tensor, match: str, tp: int = 2) -> str:
    with pytest.raises(autotp.AutoTPError, match=match) as info:
        autotp.simulate(model, tp, inputs)
    return str(info.value)


# -- 1. deny by default: a split value meets something no rule proves ---------------------


class Transposed(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return self.proj(h) + h.mT.mT[..., :8]  # .mT of a split value: no rule


class Data(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return self.proj(h) + h.data[..., :8]


@pytest.mark.parametrize(
    ("model", "match"), [(Transposed(), r"attribute \.mT"), (Data(), r"attribute \.data")]
)
def test_unknown_uses_of_a_split_value_are_refused(model: nn.Module, match: str) -> None:
    message = _refused(model, _x(), match=match)
    assert "source:" in message and "test_never_wrong.py" in message  # the user's line


def _propagate(model: nn.Module, split: dict[str, Split]) -> Propagation:
    """Propagation with the given linears split, whatever the rules would match."""
    traced = trace(model, (_x(),))
    linears = find_linears(traced.gm)
    by_module = {str(li.node.target): (li.node, li) for li in linears.values()}
    splits = {by_module[k][0]: (how, by_module[k][1]) for k, how in split.items()}
    return propagate(traced.gm, 2, linears, splits)


class Indexed(MLP):
    def __init__(self, index: object) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return self.proj(h[self.index])


@pytest.mark.parametrize(
    "index", [(Ellipsis, [0, 1]), (slice(None), slice(None), [0, 1]), (0, True),
              ([0, 1], slice(None), [0, 1]), (Ellipsis, torch.tensor([True, False]))],
)  # fmt: skip
def test_list_bool_and_tensor_indices_of_a_split_value_are_refused(index: object) -> None:
    """Along the split dimension, booleans, or more than one advanced index: refused."""
    with pytest.raises(autotp.AutoTPError, match="index"):
        _propagate(Indexed(index), {"fc": column, "proj": row})


@pytest.mark.parametrize("index", [[1, 0], (slice(None), [2, 0, 1]), torch.tensor([1, 0])])
def test_one_integer_index_off_the_split_dimension_keeps_the_split(index: object) -> None:
    """h[[1, 0]], h[:, [2, 0, 1]], h[tensor]: gathers along replicated dimensions."""
    prop = _propagate(Indexed(index), {"fc": column, "proj": row})
    assert prop.params["proj.weight"].dim == 1
    assert_equivalent(Indexed(index), (_x(),), tp=2)


def test_int_and_slice_indices_before_the_split_dimension_propagate() -> None:
    prop = _propagate(Indexed((slice(None), slice(1, None))), {"fc": column, "proj": row})
    assert prop.params["proj.weight"].dim == 1


class DictOut(MLP):
    def forward(self, x: torch.Tensor) -> dict:
        h = self.fc(x)
        return {"y": self.proj(F.gelu(h)), "inner": {"h": h, "pair": [h * 2, x]}}


def test_split_values_returned_in_dicts_and_nests_are_gathered() -> None:
    assert_equivalent(DictOut(), (_x(),), tp=2)


# -- 2. what tracing drops is kept or refused ---------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def test_hook_on_a_kept_replicated_module_runs() -> None:
    model = Block()
    model.ln.register_forward_hook(lambda mod, args, out: out * 2)
    assert_equivalent(model, (_x(),), tp=2)


@pytest.mark.parametrize("where", ["mlp", "mlp.fc", ""])
def test_hook_on_an_inlined_or_replaced_module_is_refused(where: str) -> None:
    model = Block()
    model.get_submodule(where).register_forward_pre_hook(lambda mod, args: None)
    _refused(model, _x(), match="hook")


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(8, 8)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            s = self.side(x)
        return self.mlp(x) * s


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_no_grad_region_is_kept(frontend: str) -> None:
    """Through either front-end; export records the region only when it traces with grad
    enabled (it once traced under the planner's no_grad, and the side layer trained)."""
    model = Frozen()
    sim = autotp.simulate(model, 2, (_x(),), frontend=frontend)
    sim(_x()).sum().backward()
    grads = autotp.full_grads(sim)
    assert grads["side.weight"] is None and grads["mlp.fc.weight"] is not None
    assert_equivalent(
        model, (_x(),), tp=2, parallel=lambda m, t, x: autotp.simulate(m, t, x, frontend=frontend)
    )
    with torch.no_grad():  # and the region restores the caller's mode, not a traced one
        assert not sim(_x()).requires_grad


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -grad


class Reversal(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Reverse.apply(self.proj(F.gelu(self.fc(x)))) + x


def test_custom_autograd_function_keeps_its_backward() -> None:
    assert_equivalent(Reversal(), (_x(),), tp=2)


class InsideSplit(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(Reverse.apply(F.gelu(self.fc(x))))


def test_custom_autograd_function_inside_a_split_block_stays_replicated() -> None:
    plan = autotp.plan(InsideSplit(), 2, (_x(),))
    assert not plan.splits  # the Function is opaque: no rule proves a split through it
    assert_equivalent(InsideSplit(), (_x(),), tp=2)
    with pytest.raises(autotp.AutoTPError, match="Reverse.apply"):
        _propagate(InsideSplit(), {"fc": column, "proj": row})


class Inference(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x * 2
        return super().forward(x.clone())


def test_inference_mode_inside_forward_is_refused() -> None:
    with pytest.raises(autotp.AutoTPError, match="inference"):
        autotp.plan(Inference(), 2, (_x(),), frontend="fx")


class ExplicitDropout(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc(x)), 0.5, training=False)  # never drops
        return F.dropout(self.proj(h), 1.0, training=True) + x  # always zeroes


@pytest.mark.parametrize("train", [True, False])
def test_dropout_follows_its_explicit_training_flag(train: bool) -> None:
    model = ExplicitDropout().train(train)
    assert_equivalent(model, (_x(),), tp=2)


class Branchy(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x * 2
        return super().forward(x)


def test_python_branch_on_training_refuses_the_other_mode() -> None:
    model = Branchy()
    assert_equivalent(model, (_x(),), tp=2)
    assert_equivalent(model.eval(), (_x(),), tp=2)
    sim = autotp.simulate(model.train(), 2, (_x(),))
    assert "self.training" not in str(sim.plan.traced.mode_dependent)  # it says where
    assert sim.plan.traced.mode_dependent is not None
    with pytest.raises(autotp.AutoTPError, match="planned with the model in train mode"):
        sim.eval()(_x())


def test_mode_independent_models_switch_freely() -> None:
    sim = autotp.simulate(Block(), 2, (_x(),))
    assert sim.plan.traced.mode_dependent is None
    sim.eval()(_x())
    sim.train()(_x())


class Mutating(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return super().forward(x)


def test_in_place_change_of_an_input_happens_once() -> None:
    x = _x().double()
    model = Mutating().double()
    expected = model(x.clone())
    sim = autotp.simulate(model, 4, (x.clone(),))
    mine = x.clone()
    assert torch.allclose(sim(mine), expected, rtol=0, atol=1e-12)
    assert torch.equal(mine, x + 1.0)


# -- 3. model state from the model ----------------------------------------------------------


class Wrapper(nn.Module):
    """A train-mode wrapper around an eval-mode encoder (the sentence-embedding idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Block()
        self.encoder.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.drop(self.encoder(x)))


def test_per_module_modes_are_kept() -> None:
    model = Wrapper()
    model.encoder.eval()
    assert model.training and not model.encoder.drop.training
    assert_equivalent(model, (_x(),), tp=2)


# -- 4. keyword and other spellings -----------------------------------------------------------


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.w = nn.Parameter(torch.randn(8, 32) * 0.1)
        self.b = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(input=x))
        return F.linear(h, weight=self.w, bias=self.b)


class Expand(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = F.gelu(self.fc(x))
        scale = torch.ones(1, 1, 32, dtype=x.dtype).expand(b, t, 32)
        return self.proj(h * scale)


class Softmaxed(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.sm = nn.Softmax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.sm(F.gelu(self.fc(x))))


class LayerNormed(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return self.proj(F.layer_norm(h, h.shape[-1:]))


class MeanAll(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return self.proj(h) * h.mean(dim=())


class ComputedWeight(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))
        return self.proj(h) + F.linear(h, h[0]).sum(-1, keepdim=True)


@pytest.mark.parametrize("model", [Keywords(), Expand(), Softmaxed(), LayerNormed(), MeanAll()])
def test_spellings_plan_and_match_serial_or_refuse(model: nn.Module) -> None:
    try:
        autotp.plan(model, 2, (_x(),))
    except autotp.AutoTPError as e:
        assert "hint:" in str(e)
        return
    assert_equivalent(model, (_x(),), tp=2)


def test_keyword_spellings_are_split() -> None:
    plan = autotp.plan(Keywords(), 2, (_x(),))
    assert sorted(plan.splits) == ["fc.bias", "fc.weight", "w"]
    assert_equivalent(Keywords(), (_x(),), tp=2)


def test_a_linear_whose_weight_reads_a_split_value_is_refused() -> None:
    with pytest.raises(autotp.AutoTPError, match="computed linear"):
        _propagate(ComputedWeight(), {"fc": column, "proj": row})


# -- 5. simulate behaves as real ranks ---------------------------------------------------------


class Noisy(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + torch.randn_like(x))


def test_random_ops_on_replicated_values_agree_across_simulated_ranks() -> None:
    sim = autotp.simulate(Noisy(), 4, (_x(),))
    sim(_x())
    first = sim.rank_outputs[0]
    assert all(torch.equal(first, other) for other in sim.rank_outputs[1:])
    torch.manual_seed(3)
    serial = Noisy()
    torch.manual_seed(5)
    a = serial(_x())
    sim = autotp.simulate(serial, 4, (_x(),))
    torch.manual_seed(5)
    assert torch.allclose(sim(_x()), a, atol=1e-6)  # the same draw as serial


def test_input_gradients_are_the_serial_ones() -> None:
    report = assert_equivalent(Block(), (_x(),), tp=4)
    assert "grad:input 0" in report.diffs


class PaddedLM(nn.Module):
    """A tied vocabulary with a padding row: serial gives that row no gradient."""

    def __init__(self, vocab: int = 40, c: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, c, padding_idx=1)
        self.mlp = MLP(c)
        self.head = nn.Linear(c, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.mlp(self.wte(idx)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def test_padding_row_of_a_split_embedding_gets_no_gradient() -> None:
    ids = torch.tensor([[1, 5, 1, 30], [7, 1, 22, 3]])
    model = PaddedLM()
    plan = autotp.plan(model, 2, (ids, ids))
    assert "wte.weight" in plan.splits  # the split embedding is what is checked here
    assert_equivalent(model, (ids, ids), tp=2)


# -- feedback to matching: an unprovable block stays replicated, the rest still splits ----


class OneBlockEscapes(nn.Module):
    """Two MLP blocks; the second's hidden value also reaches cumsum over the split
    dimension, which no rule proves."""

    def __init__(self) -> None:
        super().__init__()
        self.up1, self.down1 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.up2, self.down2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down1(torch.relu(self.up1(x)))
        h = self.up2(x)
        return x + self.down2(torch.relu(h)) + torch.cumsum(h, dim=-1).sum(-1, keepdim=True)


def test_an_unprovable_block_stays_replicated_and_the_rest_splits() -> None:
    from autotp.show import render
    from autotp.testing import assert_equivalent

    model = OneBlockEscapes().double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    plan = autotp.plan(model, 2, (x,))
    assert set(plan.splits) == {"up1.weight", "up1.bias", "down1.weight"}
    [(block, why)] = plan.replicated
    assert block.rule.name == "mlp" and "cumsum" in why and "torch.cumsum(h" in why
    view = render.to_text(render.unmatched_view(plan), width=300)
    assert "up2.weight" in view and "mlp matched, but its split could not be proven" in view
    assert_equivalent(model, (x,), tp=2)  # outputs, every gradient, a step: equal to serial
    with pytest.raises(autotp.AutoTPError, match="reaches 'cumsum'"):
        autotp.simulate(model, 2, (x,), strict=True)


class Chunked(MLP):
    """The block's input is one piece of a chunk: a tuple-valued node still carries the
    gradient, so the piece gets its f (the fuzzer found it missing: input and upstream
    gradients came out partial)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.ln(x).chunk(2, dim=-1)
        return self.proj(F.gelu(self.fc(a))) + b


def test_a_piece_of_a_chunk_feeding_a_split_block_gets_its_f() -> None:
    x = _x(c=16)
    sim = autotp.simulate(Chunked(), 2, (x,))
    assert sim.plan.collectives()["f"] == 1
    assert_equivalent(Chunked(), (x,), tp=2)
