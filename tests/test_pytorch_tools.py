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
# (and transformers models return dataclasses, which PyTorch warns its hooks cannot see)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:For backward hooks to be called"),
]


def _counts(cdm: CommDebugMode) -> dict[str, int]:
    return {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}


def _gpt2_under_tools(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=LAYERS)
    x = model.example_inputs()
    module = autotp.parallelize(model, world, x)
    fired = []
    norm = module.get_submodule("transformer.h.0.ln_1")
    norm.register_full_backward_hook(lambda *a: fired.append("backward"))
    norm.register_forward_hook(lambda *a: fired.append("forward"))
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


def _hf_default(name: str) -> torch.nn.Module:
    """A transformers model with its default config but for its sizes (use_cache=True)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=101))  # fmt: skip
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=101)
    )


def _first_calls_under_comm_debug_mode(rank: int, world: int, name: str) -> dict:
    model = _hf_default(name).eval()  # as from_pretrained gives it: no dropout
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    module = autotp.parallelize(model, world)
    runs = []
    for _ in range(3):  # the first call plans its regions inside CommDebugMode
        with CommDebugMode() as cdm:
            out = module(input_ids=ids, labels=ids)
            forward = _counts(cdm)
            out.loss.backward()
        runs.append((forward, _counts(cdm), out.loss.item()))
    return {"runs": runs, "serial": model(input_ids=ids, labels=ids).loss.item()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_first_call_under_comm_debug_mode_equals_later_calls(name: str) -> None:
    """A transformers model's first call plans its regions; inside CommDebugMode the hooks
    it installs on every module are not traced as the model's, and the counts are the
    later calls': 2 all-reduces per layer forward, 2 backward (the region form), with the
    vocabulary-split embedding's all-reduce forward, the head's backward and the logits'
    all-gather."""
    for r in run_on_gloo(_first_calls_under_comm_debug_mode, 2, name):
        for forward, total, loss in r["runs"]:
            assert forward == {"allreduce_": 2 * LAYERS + 1, "allgather_": 1}
            assert total == {"allreduce_": 4 * LAYERS + 2, "allgather_": 1}
            assert loss == pytest.approx(r["serial"], rel=1e-6)


@pytest.mark.parametrize("tool", ["global_hook", "profiler"])
def test_first_call_under_a_global_hook_or_the_profiler(tool: str) -> None:
    """Global module hooks and the profiler around a first call are neither traced into
    a region nor refused; the hook sees the parallel model's modules run."""
    from torch.nn.modules.module import register_module_forward_hook

    model = _hf_default("gpt2").double().eval()
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids, labels=ids).loss
    sim = autotp.simulate(model, 2)
    seen: list[str] = []
    if tool == "global_hook":
        handle = register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
        try:
            loss = sim(input_ids=ids, labels=ids).loss
        finally:
            handle.remove()
        assert "ParallelGPT2Block" in seen and "GPT2LMHeadModel" in seen
    else:
        with torch.profiler.profile():
            loss = sim(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    loss.backward()
