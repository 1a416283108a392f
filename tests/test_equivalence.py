"""Property: for every small GPT-2/BERT configuration and tp dividing its heads, the
simulated tensor-parallel model equals the serial one in float64: outputs, loss, every
gradient and the weights after one optimiser step, to 1e-10."""

import pytest
import torch
from hypothesis import given, settings

import autotp
from autotp.testing import TPCase, assert_equivalent, tp_cases

ATOL = 1e-10


@pytest.mark.slow
@settings(max_examples=40)
@given(case=tp_cases())
def test_simulated_tp_equals_serial(case: TPCase) -> None:
    model = case.build()
    assert_equivalent(model, case.inputs(model), case.tp, atol=ATOL)


@settings(max_examples=10)
@given(case=tp_cases(tps=(2, 4)))
def test_other_batch_and_sequence_than_traced(case: TPCase) -> None:
    """The traced graph is shape-generic: a module planned on one input shape runs others."""
    model = case.build().double()
    sim = autotp.simulate(model, case.tp, model.example_inputs(batch=2, seq=4))
    other = model.example_inputs(batch=3, seq=7)
    got, want = sim(**other), model(**other)
    assert (got[0] - want[0]).abs().max().item() <= ATOL
    assert (got[1] - want[1]).abs().item() <= ATOL


def test_tp1_is_the_original_function() -> None:
    from autotp.models import build

    for name in ("gpt2-tiny", "bert-tiny"):
        model = build(name).double()
        x = model.example_inputs()
        par = autotp.parallelize(model, 1, x)
        assert torch.equal(par(**x)[0], model(**x)[0])
        assert assert_equivalent(model, x, 1, atol=0.0).largest() == 0.0


class Patches(torch.nn.Module):
    """An image model's front: pixel_values [B, C, H, W], channels feed a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 16)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixel_values.flatten(2).transpose(1, 2))  # (B, H*W, C) -> hidden
        return x + self.down(torch.relu(self.up(x)))


def test_export_keeps_channels_static_and_batch_dynamic() -> None:
    """Only the dimensions that vary are dynamic: the batch of every input, the sequence of
    token inputs; the channels of pixel_values stay static (they were dynamic, and export
    refused the model: "Constraints violated")."""
    from autotp.capture.trace import dynamic_dims

    model = Patches().double()
    x = {"pixel_values": torch.randn(2, 4, 3, 3, dtype=torch.float64)}
    sim = autotp.simulate(model, 2, x, frontend="export")
    other = torch.randn(5, 4, 3, 3, dtype=torch.float64)  # another batch
    with torch.no_grad():
        assert (sim(pixel_values=other) - model(other)).abs().max().item() <= ATOL
    assert list(dynamic_dims(x["pixel_values"])) == [0]
    assert list(dynamic_dims(torch.zeros(2, 7, dtype=torch.long))) == [0, 1]


def test_export_front_end_gives_the_same_function() -> None:
    """The reference models through torch.export (aten ops, dynamic batch and sequence)
    equal serial like the fx route."""
    from autotp.models import build

    for name in ("gpt2-tiny", "bert-tiny-preln"):
        model = build(name)
        report = assert_equivalent(
            model, None, 2, parallel=lambda m, tp, x: autotp.simulate(m, tp, x, frontend="export")
        )
        assert report.largest() <= ATOL


def test_export_with_an_example_batch_of_one_keeps_the_batch_dynamic() -> None:
    """torch.export fixes a dimension it sees as 1; autotp traces with that dimension
    doubled, so a model planned on one example runs on any batch (it was refused)."""
    model = Patches().double()
    one = {"pixel_values": torch.randn(1, 4, 3, 3, dtype=torch.float64)}
    sim = autotp.simulate(model, 2, one, frontend="export")
    other = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        assert (sim(pixel_values=other) - model(other)).abs().max().item() <= ATOL
        assert (sim(**one) - model(**one)).abs().max().item() <= ATOL
