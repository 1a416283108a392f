"""Dropout: a stream shared by the TP ranks for replicated values, a stream per rank inside
split regions (torch.Generator, so CPU and GPU alike)."""

from __future__ import annotations

import torch

import autotp
from autotp.models import build
from autotp.rewrite.sites import site_kind
from autotp.runtime.random import RankRandom, StreamDropout
from autotp.testing import run_on_gloo


def test_streams_are_assigned_by_placement() -> None:
    plan = autotp.plan(build("gpt2-tiny", n_layer=1, dropout=0.1), 2)
    streams = {
        n.meta["nn_module_stack"] and list(n.meta["nn_module_stack"].values())[-1][0]: site_kind(
            n.target
        )
        for n in plan.graph.nodes
        if str(n.target).startswith("tp_dropout")
    }
    assert streams == {
        "transformer.drop": "tp_dropout_shared",
        "transformer.h.0.attn.attn_dropout": "tp_dropout_rank",  # on split heads
        "transformer.h.0.attn.resid_dropout": "tp_dropout_shared",
        "transformer.h.0.mlp.dropout": "tp_dropout_shared",
    }


def test_rank_stream_keeps_1_minus_p_and_differs_across_ranks() -> None:
    p, n = 0.3, 200_000
    x = torch.ones(n, dtype=torch.float64)
    masks = []
    for rank in range(4):
        drop = StreamDropout(RankRandom(seed=7, rank=rank), "rank")
        y = drop(x, p)
        kept = (y != 0).double().mean().item()
        # binomial: standard deviation sqrt(p(1-p)/n) ~ 0.001; allow 5 of them
        assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
        assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
        masks.append(y != 0)
    assert not torch.equal(masks[0], masks[1])


def test_shared_stream_is_identical_across_ranks() -> None:
    x = torch.ones(1000)
    a = StreamDropout(RankRandom(seed=7, rank=0), "shared")(x, 0.5)
    b = StreamDropout(RankRandom(seed=7, rank=3), "shared")(x, 0.5)
    assert torch.equal(a, b)


def test_eval_mode_and_p0_are_identity() -> None:
    x = torch.randn(100)
    drop = StreamDropout(RankRandom(0, 0), "rank")
    assert drop(x, 0.0) is x
    drop.eval()
    assert drop(x, 0.5) is x


def _train_step_with_dropout(rank: int, world: int) -> list:
    torch.manual_seed(0)
    model = build("gpt2-tiny", dropout=0.2)  # identical serial weights on every rank
    torch.manual_seed(99 + rank)  # divergent seeds: the group agrees on rank 0's
    x = model.example_inputs()
    par = autotp.parallelize(model, world, x)
    par.train()
    logits, loss = par(**x)
    loss.backward()
    ln = par.get_parameter("transformer.ln_f.weight").grad
    return [loss.item(), logits.double().sum().item(), ln.double().sum().item()]


def test_replicated_values_bitwise_identical_across_ranks_in_training() -> None:
    """With dropout on, replicated activations (so the loss, the gathered logits and the
    replicated gradients) are bitwise identical on every rank."""
    results = run_on_gloo(_train_step_with_dropout, 2)
    assert results[0] == results[1]


def test_parallel_module_starts_in_the_models_mode() -> None:
    """A model in eval mode gives a parallel module in eval mode: no dropout, as serial."""
    model = build("gpt2-tiny", dropout=0.3).double().eval()
    x = model.example_inputs()
    sim = autotp.simulate(model, 2, x)
    par = autotp.parallelize(model, 1, x)
    assert not sim.training and not par.training
    assert (sim(**x)[1] - model(**x)[1]).abs() < 1e-12
    assert torch.equal(par(**x)[0], model(**x)[0])
    assert autotp.simulate(model.train(), 2, x).training
