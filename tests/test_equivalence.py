"""Property: for every small GPT-2/BERT configuration and tp dividing its heads, the
simulated tensor-parallel model equals the serial one in float64: outputs, loss, every
gradient and the weights after one optimiser step, to 1e-10."""

import torch
from hypothesis import given, settings

import autotp
from autotp.testing import TPCase, assert_equivalent, tp_cases

ATOL = 1e-10


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
