"""The rank module compiles: with fullgraph=True (no graph break anywhere, the collectives
included) at tp=1 and on two gloo ranks, giving eager's outputs and gradients, and
count_collectives still records what ran.

Kept cheap: the two-rank check uses the aot_eager backend (dynamo and AOTAutograd, no code
generation; exact), and inductor compiles one forward at tp=1 (its C++ kernels cost most of
this file's time on a cold cache)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import autotp
from autotp.models import build
from autotp.testing import run_on_gloo


def _gpt2(world: int, sequence_parallel: bool = False) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=1).double()
    x = model.example_inputs()
    return autotp.parallelize(model, world, x, sequence_parallel=sequence_parallel), x


def _step(module: torch.nn.Module, run: torch.nn.Module, x: dict) -> tuple:
    """Logits, loss, every parameter's gradient and the collectives recorded."""
    module.zero_grad(set_to_none=True)
    with autotp.count_collectives() as log:
        logits, loss = run(**x)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return logits.detach(), loss.detach(), grads, log.events


def _eager_and_compiled(rank: int, world: int, sp: bool = False) -> tuple[tuple, tuple]:
    module, x = _gpt2(world, sp)
    eager = _step(module, module, x)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    _step(module, compiled, x)  # compiles
    return eager, _step(module, compiled, x)


def _on_rank(rank: int, world: int) -> dict:
    return {
        "gpt2": _eager_and_compiled(rank, world), "each": _every_collective(rank, world),
        "sp": _eager_and_compiled(rank, world, sp=True),
    }  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Both checks below on one pair of gloo ranks (dynamo warms up once)."""
    return run_on_gloo(_on_rank, 2)


@pytest.mark.slow
def test_rank_module_compiles_whole_on_two_gloo_ranks(two_ranks: list[dict]) -> None:
    """fullgraph=True: dynamo traces every collective, forward and backward, without a
    break; the compiled module's numbers are eager's exactly, and it records the same
    collectives (2 + 1 + 3 forward, 2 + 1 backward for one layer)."""
    for eager, compiled in (r["gpt2"] for r in two_ranks):
        assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
        assert eager[2].keys() == compiled[2].keys()
        for name, grad in eager[2].items():
            assert torch.equal(grad, compiled[2][name]), name
        assert len(eager[3]) == 10 and sorted(compiled[3]) == sorted(eager[3])


def test_a_sequence_parallel_rank_module_compiles_whole(two_ranks: list[dict]) -> None:
    """With sequence parallelism too: eager's numbers exactly. Compiled, the gathered
    sequences are kept whole for backward (eager keeps each rank's part and gathers it
    again: 2 all-gathers more for one layer)."""
    for eager, compiled in (r["sp"] for r in two_ranks):
        assert torch.equal(eager[1], compiled[1])
        for name, grad in eager[2].items():
            assert torch.equal(grad, compiled[2][name]), name
        regather = ("all_gather", "backward")
        assert (
            sum(e[:2] == regather for e in eager[3])
            == sum(e[:2] == regather for e in compiled[3]) + 3
        )  # the 2 blocks' inputs and the output layer's


def test_rank_module_compiles_whole_with_inductor_at_tp1() -> None:
    module, x = _gpt2(1)
    with torch.no_grad():
        logits, loss = module(**x)
        torch._dynamo.reset()
        compiled_logits, compiled_loss = torch.compile(module, fullgraph=True)(**x)
    torch.testing.assert_close(compiled_logits, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-10)


def _every_collective(rank: int, world: int) -> tuple[tuple, tuple]:
    import autotp.runtime.collectives as C

    comm = C.ProcessGroupComm(None)
    f, g, top, gather, scatter, gather_sp, reduce_sp, many = (
        m(comm)
        for m in (C.CopyToTP, C.ReduceFromTP, C.ReduceMaxTP, C.GatherFromTP, C.ScatterToSP)
        + (C.GatherFromSP, C.ReduceScatterToSP, C.CopyManyToTP)
    )
    torch.manual_seed(rank)
    w, b = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        ww, bb = many(w, b)
        h = gather_sp(scatter(x, 1) * ww + bb, 1)  # (2, 4, 6)
        h = gather_sp(reduce_sp(h * h, 1), 1)
        h = g(f(h) * 3, inplace=True)
        return gather(h - top(h), 2, 11).sum()

    runs = []
    for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        x.grad = w.grad = b.grad = None
        with autotp.count_collectives() as log:
            y = run(x)
            y.backward()
        runs.append((y.detach(), x.grad, w.grad, b.grad, sorted(log.events)))
    return runs[0], runs[1]


def test_every_collective_compiles_on_two_gloo_ranks(two_ranks: list[dict]) -> None:
    """Each collective module, sequence-parallel ones included, in one fullgraph=True
    graph: forward, input and parameter gradients, and the collectives recorded equal
    eager's."""
    for eager, compiled in (r["each"] for r in two_ranks):
        for a, b in zip(eager[:4], compiled[:4], strict=True):
            assert torch.equal(a, b)
        assert len(eager[4]) == 12 and compiled[4] == eager[4]


def test_an_indivisible_sequence_is_refused_under_compile_too() -> None:
    """The refusal breaks the graph and raises the AutoTPError from there."""
    from autotp.common.errors import AutoTPError
    from autotp.runtime.collectives import simulated_scatter_to_sp

    torch._dynamo.reset()
    scatter = torch.compile(lambda xs: simulated_scatter_to_sp(xs, 1), backend="eager")
    assert [y.shape for y in scatter([torch.randn(2, 6, 4)] * 2)] == [(2, 3, 4)] * 2
    with pytest.raises(AutoTPError, match="multiple of tp"):
        scatter([torch.randn(2, 5, 4)] * 2)
