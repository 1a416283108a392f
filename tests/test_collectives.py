"""Megatron's communication, not more: per transformer layer and training step, exactly two
all-reduces forward and two backward, each of batch x seq x hidden elements; plus one
forward all-reduce for the vocabulary-split embedding (batch x seq x hidden), the
vocab-parallel loss's three all-reduces of batch x seq numbers (max, target logit, sum of
exponentials) and the output layer's f in backward. Counted as they run, not read from
the plan."""

import pytest
import torch

import autotp
import autotp.runtime.collectives as C
from autotp.common.errors import AutoTPError
from autotp.models import build
from autotp.testing import run_on_gloo


def _step(module, inputs) -> C.CollectiveLog:
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


# -- the sequence-parallel operators, on their own ------------------------------------------

SP_OPS = {
    "scatter": (C.ScatterToSP, C.simulated_scatter_to_sp),
    "gather": (C.GatherFromSP, C.simulated_gather_from_sp),
    "reduce_scatter": (C.ReduceScatterToSP, C.simulated_reduce_scatter_to_sp),
}
# what each runs, as count_collectives records it: (kind, direction, elements), 48 elements
# for the whole (2, 4, 6) tensor and 24 for a rank's half
SP_EVENTS = {
    "scatter": [("all_gather", "backward", 24)],
    "gather": [("all_gather", "forward", 24), ("reduce_scatter", "backward", 48)],
    "reduce_scatter": [("reduce_scatter", "forward", 48), ("all_gather", "backward", 24)],
}
SP_COMMS = {  # and as CommDebugMode counts the c10d calls
    "scatter": {"_allgather_base_": 1},
    "gather": {"_allgather_base_": 1, "_reduce_scatter_base_": 1},
    "reduce_scatter": {"_allgather_base_": 1, "_reduce_scatter_base_": 1},
}


def _sp_case(op: str, dim: int, tp: int) -> tuple[list, list, list, list]:
    """Each rank's input and output-gradient weights, and the outputs and input gradients
    the operator must give: the math, written out with cat, chunk and sum."""
    g = torch.Generator().manual_seed(0)
    full = [2, 4, 6]
    if op == "gather":  # each rank holds a chunk
        full[dim] //= tp
    xs = [torch.randn(full, generator=g, dtype=torch.float64) for _ in range(tp)]
    if op == "scatter":
        ys = [x.chunk(tp, dim)[r] for r, x in enumerate(xs)]
    elif op == "gather":
        ys = [torch.cat(xs, dim)] * tp
    else:
        ys = list(sum(xs).chunk(tp, dim))
    ws = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
    if op == "gather":
        grads = list(sum(ws).chunk(tp, dim))
    else:
        grads = [torch.cat(ws, dim)] * tp
    return xs, ws, ys, grads


def _sp_on_rank(rank: int, world: int) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    comm = C.ProcessGroupComm(None)
    out = {}
    for op, (module, _) in SP_OPS.items():
        for dim in (0, 1, -1):
            xs, ws, _, _ = _sp_case(op, dim, world)
            x = xs[rank].clone().requires_grad_()
            with CommDebugMode() as cdm, autotp.count_collectives() as log:
                y = module(comm)(x, dim)
                (y * ws[rank]).sum().backward()
            counts = {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}
            out[op, dim] = (y.detach(), x.grad, log.events, counts)
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2)]
    ps = [p.clone().requires_grad_() for p in ps]
    with CommDebugMode() as cdm, autotp.count_collectives() as log:
        a, b = C.CopyManyToTP(comm)(*ps)
        (a * (rank + 1) + b * b).sum().backward()
    counts = {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}
    out["many"] = ([p.grad for p in ps], log.events, counts)
    return out


@pytest.mark.parametrize("op", sorted(SP_OPS))
@pytest.mark.parametrize("dim", [1, -1])
def test_simulated_sequence_parallel_ops_are_their_math(op: str, dim: int) -> None:
    xs, ws, ys, grads = _sp_case(op, dim, 2)
    xs = [x.clone().requires_grad_() for x in xs]
    with autotp.count_collectives() as log:
        outs = SP_OPS[op][1](xs, dim)
        sum((y * w).sum() for y, w in zip(outs, ws, strict=True)).backward()
    for r in range(2):
        assert torch.equal(outs[r], ys[r]) and torch.equal(xs[r].grad, grads[r])
    assert log.events == SP_EVENTS[op]


def test_sequence_parallel_ops_on_two_gloo_ranks() -> None:
    """Forward and backward of each operator equal the math on every rank; each records
    its collectives once, and CommDebugMode counts the same c10d calls."""
    results = run_on_gloo(_sp_on_rank, 2)
    for rank, out in enumerate(results):
        for (op, dim), (y, grad, events, counts) in ((k, v) for k, v in out.items() if k != "many"):
            _, _, ys, grads = _sp_case(op, dim, 2)
            assert torch.equal(y, ys[rank]) and torch.equal(grad, grads[rank]), (op, dim)
            assert events == SP_EVENTS[op] and counts == SP_COMMS[op], (op, dim)
        grads, events, counts = out["many"]
        g = torch.Generator().manual_seed(1)
        ps = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2)]
        assert torch.equal(grads[0], torch.full((5,), 3.0, dtype=torch.float64))  # 1 + 2
        assert torch.equal(grads[1], 4 * ps[1])  # 2b on each rank, summed
        assert events == [("all_reduce", "backward", 10)] and counts == {"allreduce_": 1}


def test_simulated_copy_many_all_reduces_once() -> None:
    ps = [
        [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        for _ in range(2)
    ]
    with autotp.count_collectives() as log:
        outs = C.simulated_copy_many([tuple(p) for p in ps])
        loss = sum(
            (y * (r + 1) * (i + 1)).sum() for r, ys in enumerate(outs) for i, y in enumerate(ys)
        )
        loss.backward()
    for rank in ps:
        for i, p in enumerate(rank):
            assert torch.equal(p.grad, torch.full((4, 3), 3.0 * (i + 1), dtype=torch.float64))
    assert log.events == [("all_reduce", "backward", 36)]


def test_sequence_not_divisible_by_tp_is_refused() -> None:
    xs = [torch.randn(2, 5, 4) for _ in range(2)]
    with pytest.raises(AutoTPError, match="multiple of tp"):
        C.simulated_scatter_to_sp(xs, 1)
    with pytest.raises(AutoTPError, match="multiple of tp"):
        C.simulated_reduce_scatter_to_sp(xs, 1)


def test_sequence_parallel_ops_at_tp1_are_the_identity() -> None:
    x = torch.randn(2, 5, 4)
    comm = C.LocalComm()
    for module in (C.ScatterToSP, C.GatherFromSP, C.ReduceScatterToSP):
        assert module(comm)(x, 1) is x
    assert C.CopyManyToTP(comm)(x, x) == (x, x)
