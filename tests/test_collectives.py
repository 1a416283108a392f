"""Megatron's communication, not more: per transformer layer and training step, exactly two
all-reduces forward and two backward, each of batch x seq x hidden elements; plus one
forward all-reduce for the vocabulary-split embedding (batch x seq x hidden), the
vocab-parallel loss's three all-reduces of batch x seq numbers (max, target logit, sum of
exponentials) and the output layer's f in backward. Counted as they run, not read from
the plan."""

import pytest
import torch

import autotp
from autotp.models import build


def _step(module, inputs) -> autotp.collectives.CollectiveLog:
    with autotp.count_collectives() as log:
        _, loss = module(**inputs)
        loss.backward()
    return log


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_two_all_reduces_each_way_per_layer(family: str, tp: int, layers: int) -> None:
    if family == "gpt2":
        model = build("gpt2-tiny", n_layer=layers).double()
        hidden = model.config.n_embd
    else:
        model = build("bert-tiny", num_hidden_layers=layers).double()
        hidden = model.config.hidden_size
    batch, seq = 3, 7
    x = model.example_inputs(batch=batch, seq=seq)
    sim = autotp.simulate(model, tp, x, vocab=autotp.VocabOptions(gather_outputs=False))
    log = _step(sim, x)
    bsh, bs = batch * seq * hidden, batch * seq
    forward = [(k, n) for k, d, n in log.events if d == "forward"]
    backward = [(k, n) for k, d, n in log.events if d == "backward"]
    assert sorted(forward) == sorted(
        [("all_reduce", bsh)] * (2 * layers + 1)  # blocks, embedding
        + [("all_reduce", bs)] * 2  # target logit, sum of exponentials
        + [("all_reduce_max", bs)]  # row max
    )
    assert backward == [("all_reduce", bsh)] * (2 * layers + 1)  # blocks, output layer


def test_no_collectives_at_tp1() -> None:
    model = build("gpt2-tiny").double()
    x = model.example_inputs()
    assert _step(autotp.parallelize(model, 1, x), x).count() == 0


def test_forward_only_has_no_backward_collectives() -> None:
    model = build("bert-tiny", num_hidden_layers=2).double()
    x = model.example_inputs()
    sim = autotp.simulate(model, 2, x)
    with torch.no_grad(), autotp.count_collectives() as log:
        sim(**x)
    assert (log.count("forward", "all_reduce"), log.count("backward")) == (4 + 1 + 2, 0)


def test_plan_counts_agree_with_what_ran() -> None:
    model = build("gpt2-tiny", n_layer=3).double()
    plan = autotp.plan(model, 2)
    assert plan.collectives() == {"f": 6 + 1, "g": 6 + 1 + 2, "max": 1, "gather": 1}
