"""PyTorch's own tools work on parallel modules: CommDebugMode counts exactly Megatron's
collectives, module hooks and the profiler run, and nothing crashes under them."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

import autotp
from autotp.models import build
from autotp.testing import run_on_gloo

LAYERS = 2
# CommDebugMode hooks every module, the token embedding too, whose input (ids) needs no
# gradient; PyTorch warns about that for any model, serial or parallel
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _counts(cdm: CommDebugMode) -> dict[str, int]:
    return {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}


def _gpt2_under_tools(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=LAYERS)
    x = model.example_inputs()
    module = autotp.parallelize(model, world, x)
    fired = []
    block = module.get_submodule("transformer.h.0.ln_1")
    block.register_full_backward_hook(lambda *a: fired.append("backward"))
    block.register_forward_hook(lambda *a: fired.append("forward"))
    with CommDebugMode() as cdm:
        _, loss = module(**x)
        forward = _counts(cdm)
        loss.backward()
    total = _counts(cdm)
    with torch.profiler.profile() as prof:
        module(**x)[1].backward()
    names = {e.name for e in prof.events()}
    return {
        "forward": forward,
        "backward": {k: total[k] - forward.get(k, 0) for k in total},
        "fired": fired,
        "profiled_allreduce": any("allreduce" in n for n in names),
        "loss": loss.item(),
    }


def test_comm_debug_mode_counts_megatron_collectives_on_gloo() -> None:
    """GPT-2 at tp=2 under CommDebugMode, a full backward hook on a submodule, and the
    profiler: 2 all-reduces per layer + 1 (embedding) + 3 (the loss) forward, one
    all-gather (the returned logits), 2 per layer + 1 backward: Megatron's count."""
    results = run_on_gloo(_gpt2_under_tools, 2)
    for r in results:
        assert r["forward"] == {"allreduce_": 2 * LAYERS + 1 + 3, "allgather_": 1}
        assert r["backward"] == {"allreduce_": 2 * LAYERS + 1, "allgather_": 0}
        assert r["fired"] == ["forward", "backward", "forward", "backward"]
        assert r["profiled_allreduce"]
    assert results[0]["loss"] == results[1]["loss"]


def test_simulate_runs_under_comm_debug_mode_and_hooks() -> None:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=LAYERS)
    x = model.example_inputs()
    sim = autotp.simulate(model, 2, x)
    expected = sim(**x)[1]
    sim.ranks[1].get_submodule("transformer.h.0.ln_1").register_full_backward_hook(lambda *a: None)
    with CommDebugMode(), autotp.count_collectives() as log:
        _, loss = sim(**x)
        loss.backward()
    assert torch.equal(loss, expected)
    assert log.count("forward", "all_reduce") == 2 * LAYERS + 1 + 2
    assert log.count("backward", "all_reduce") == 2 * LAYERS + 1


def test_hooks_on_a_parallel_module_do_not_reach_the_model_or_other_ranks() -> None:
    model = build("gpt2-tiny", n_layer=1)
    sim = autotp.simulate(model, 2, model.example_inputs())
    sim.ranks[0].get_submodule("transformer.h.0.ln_1").register_forward_hook(lambda *a: None)
    assert not model.transformer.h[0].ln_1._forward_hooks
    assert not sim.ranks[1].get_submodule("transformer.h.0.ln_1")._forward_hooks
