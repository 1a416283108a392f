"""Sequence parallelism (`sequence_parallel=True`): between the split blocks each rank holds
1/tp of the sequence; the all-reduce after a row-split block is a reduce-scatter and the f
before a column-split block an all-gather. Properties: equal to serial in float64
(outputs, loss, every gradient, input gradients, one optimiser step), in one process and
on gloo ranks, on the reference models, Hugging Face models and fuzzed structures; the
collectives are exactly Megatron-LM's (counted by autotp and by PyTorch's CommDebugMode);
what cannot be proven is read whole or refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.distributed.tensor.debug import CommDebugMode

import autotp
import autotp.runtime.collectives as C
from autotp.common.errors import AutoTPError
from autotp.models import build
from autotp.sharding import Shard
from autotp.testing import assert_equivalent, run_on_gloo
from autotp.testing.fuzz import check_case, check_case_gloo, model_cases, random_case

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Implicit dimension choice:UserWarning"),
]


def _sp(model, tp, x):
    """The whole-graph form (a transformers model's is asked for by name)."""
    return autotp.simulate(model, tp, x, sequence_parallel=True, form="graph")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny", "bert-tiny-preln"])
def test_sequence_parallel_equals_serial(name: str, tp: int) -> None:
    torch.manual_seed(0)
    model = build(name)
    report = assert_equivalent(model, None, tp, parallel=_sp)
    assert report.largest() < 1e-10


def _counts(layers: int, tp: int = 2) -> dict[tuple[str, str], int]:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=layers)
    x = model.example_inputs()
    sim = _sp(model, tp, x)
    with autotp.count_collectives() as log:
        _, loss = sim(**x)
        loss.backward()
    out: dict[tuple[str, str], int] = {}
    for kind, direction, _ in log.events:
        out[(kind, direction)] = out.get((kind, direction), 0) + 1
    return out


def test_collectives_per_layer_are_megatrons() -> None:
    """Per layer: 2 reduce-scatters + 2 all-gathers forward, 2 + 2 backward and the 2
    inputs gathered again (autograd keeps each rank's part), no all-reduce (the
    all-reduces are the loss's 3 numbers per token, and one of all the parameters'
    gradients read by per-token compute, at the end of backward)."""
    two, three = _counts(2), _counts(3)
    per_layer = {k: three.get(k, 0) - two.get(k, 0) for k in set(two) | set(three)}
    assert {k: v for k, v in per_layer.items() if v} == {
        ("reduce_scatter", "forward"): 2, ("all_gather", "forward"): 2,
        ("reduce_scatter", "backward"): 2, ("all_gather", "backward"): 4,
    }  # fmt: skip
    # the rest: the embedding's reduce-scatter, the output layer's all-gather (and the
    # logits returned whole), the positions' part (all-gathered back), the loss
    assert two == {
        ("reduce_scatter", "forward"): 5, ("all_gather", "forward"): 6,
        ("all_reduce", "forward"): 2, ("all_reduce_max", "forward"): 1,
        ("reduce_scatter", "backward"): 5, ("all_gather", "backward"): 11,
        ("all_reduce", "backward"): 1,
    }  # fmt: skip


def test_the_regions_between_blocks_hold_a_sequence_split() -> None:
    """Layer norms, dropout and residuals are placed S(1) (the sequence of [B, T, C]) by
    the propagation; the blocks' inputs are read whole."""
    model = build("gpt2-tiny", n_layer=2)
    p = autotp.plan(model, 2, model.example_inputs(), sequence_parallel=True)
    placed = {n.name: pl for n, pl in p.propagation.placements.items()}
    for name in ("transformer_h_0_ln_1", "transformer_h_0_ln_2", "add_2", "transformer_ln_f"):
        assert placed[name] == Shard(1), (name, placed[name])
    assert set(p.propagation.scatters.values()) == {Shard(1)}
    assert len(p.propagation.sequence_gathers) == 5  # 2 blocks x 2, and the output layer


def _gloo_sp(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=2)
    report = assert_equivalent(
        model, None, world,
        parallel=lambda m, tp, x: autotp.parallelize(m, tp, x, sequence_parallel=True),
    )  # fmt: skip
    model = build("gpt2-tiny", n_layer=2)
    x = model.example_inputs()
    module = autotp.parallelize(model, world, x, sequence_parallel=True)
    with CommDebugMode() as cdm, autotp.count_collectives() as log:
        _, loss = module(**x)
        loss.backward()
    counts = {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    # what autograd keeps of the sequences gathered for the blocks: the rank's part
    kept: dict[int, int] = {}
    keep = C._pack

    def counting(t: torch.Tensor) -> object:
        out = keep(t)
        s = (out[0].part if isinstance(out, tuple) else out).untyped_storage()
        kept[s.data_ptr()] = s.nbytes()
        return out

    C._pack = counting
    try:
        module.zero_grad()
        module(**x)[1].backward()
    finally:
        C._pack = keep
    same = all(torch.equal(p.grad, grads[n]) for n, p in module.named_parameters())
    # inside the caller's own saved-tensor hooks the gathered sequence is kept whole
    parts, kept = sum(kept.values()), {}

    def whole(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    module.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(whole, lambda t: t):
        module(**x)[1].backward()
    same_in_hooks = all(torch.equal(p.grad, grads[n]) for n, p in module.named_parameters())
    b, t = x["idx"].shape
    return {
        "largest": report.largest(), "cdm": counts, "ours": len(log.events),
        "saved": sum(kept.values()) - parts,
        "sequence": b * t * model.config.n_embd * next(module.parameters()).element_size(),
        "same": same, "same_in_hooks": same_in_hooks,
    }  # fmt: skip


def test_sequence_parallel_on_gloo_ranks_equals_serial_and_counts_under_comm_debug_mode() -> None:
    """Real ranks: equal to serial; CommDebugMode counts what count_collectives does;
    autograd keeps each rank's part of a gathered sequence, not the whole."""
    for r in run_on_gloo(_gloo_sp, 2):
        assert r["largest"] < 1e-10
        assert sum(r["cdm"].values()) == r["ours"], r
        # 2 layers: 5 reduce-scatters forward and 5 backward; all-gathers: 5 forward, 6
        # backward, and 5 more backward: the blocks' inputs gathered again, as autograd
        # keeps only the rank's part (Megatron-LM's); the logits gathered; the loss's 3
        # all-reduces and the parameters' one
        assert r["cdm"] == {
            "_reduce_scatter_base_": 10, "_allgather_base_": 16, "allgather_": 1,
            "allreduce_": 4,
        }  # fmt: skip
        assert r["same"] and r["same_in_hooks"]
        # 5 sequences gathered (2 a layer and the output layer's), each kept as half
        assert r["saved"] == 5 * r["sequence"] // 2


def test_a_sequence_not_divisible_by_tp_is_refused_with_a_hint() -> None:
    model = build("gpt2-tiny", n_layer=1)
    sim = _sp(model, 2, model.example_inputs())
    ids = torch.randint(0, 256, (2, 7))
    with pytest.raises(AutoTPError, match="multiple of"):
        sim(idx=ids, targets=ids)


def _llama_sp() -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize(
    ("name", "tp", "kv"),
    [("gpt2", 2, None), ("llama", 4, 2), ("qwen2", 2, 2), ("bert-mlm", 2, None)],
)
def test_the_region_form_with_sequence_parallelism_equals_serial(name, tp, kv) -> None:
    """GPT-2, Llama with fewer key/value heads than ranks, Qwen2 and BERT-MLM, planned by
    regions with sequence parallelism inside each layer: outputs, loss, every gradient and
    a step equal serial in float64 (float32 inside some of them, as serially)."""
    pytest.importorskip("transformers")
    from hf_models import RTOL_FLOAT32_INSIDE, build, inputs

    model = build(name, kv_heads=kv).double()
    x = inputs(name)
    plan = autotp.plan(model, tp, x, form="regions", sequence_parallel=True)
    assert plan.sequence_parallel and {r.kind for r in plan.regions} >= {"layer", "embedding"}
    assert_equivalent(model, x, tp, atol=1e-10, rtol=RTOL_FLOAT32_INSIDE[name],
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip


def _region_sp_on_rank(rank: int, world: int) -> tuple[float, float]:
    model = _llama_sp()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    module = autotp.parallelize(model, world, form="regions", sequence_parallel=True)
    loss = module(input_ids=ids, labels=ids).loss
    loss.backward()
    norm = torch.stack([g.norm() ** 2 for g in autotp.full_grads(module).values()
                        if g is not None]).sum().sqrt()  # fmt: skip
    return loss.item(), norm.item()


@pytest.mark.slow
def test_the_region_form_hands_the_split_sequence_from_layer_to_layer() -> None:
    """form="regions" with sequence_parallel=True (a transformers model keeps its own
    Python, its keywords and generate()): each layer hands its hidden state to the next
    split along the sequence; equal to serial in simulate and on gloo, the collectives
    counted, and the plan says so."""
    pytest.importorskip("transformers")
    model = _llama_sp()
    plan = autotp.plan(model, 2, form="regions", sequence_parallel=True)
    assert isinstance(plan, autotp.RegionPlan) and plan.sequence_parallel
    assert any("hands its hidden state" in n for n in plan.notes())
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert_equivalent(model, x, 2, atol=1e-10, rtol=1e-6,
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip
    sim = autotp.simulate(model, plan)
    with autotp.count_collectives() as log:
        sim(**x).loss.backward()
    # forward, Megatron's: the embedding's sum reduce-scattered; per layer the attention's
    # and the MLP's sums reduce-scattered, the sequence gathered for each; the final
    # norm's gather of the last layer's output and the logits' gather
    assert log.count("forward", "reduce_scatter") == 1 + 2 * 2
    assert log.count("forward", "all_gather") == 2 * 2 + 1 + 1
    assert log.count("forward", "all_reduce") == 0
    # backward: a reduce-scatter per gather for split compute; all-gathers for the
    # forward's reduce-scatters and the parts autograd kept, gathered again; all-reduces:
    # the head's f and the norm weights' gradients of each layer, as one
    assert log.count("backward", "reduce_scatter") == 2 * 2
    assert log.count("backward", "all_gather") == 5 + 4
    assert log.count("backward", "all_reduce") == 1 + 2
    prompt = {"input_ids": ids[:, :4], "attention_mask": torch.ones_like(ids[:, :4])}
    want = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(sim.generate(**prompt, max_new_tokens=4, do_sample=False), want)
    serial = model(input_ids=ids, labels=ids).loss
    serial.backward()
    norm = torch.stack([p.grad.norm() ** 2 for p in model.parameters()]).sum().sqrt()
    for loss, grad_norm in run_on_gloo(_region_sp_on_rank, 2):
        assert loss == pytest.approx(serial.item(), rel=1e-9)
        assert grad_norm == pytest.approx(norm.item(), rel=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_models_with_sequence_parallelism_equal_serial(arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64, use_cache=False
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, use_cache=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 300, (2, 8))
    x = {"input_ids": ids, "labels": ids}
    # Llama's loss upcasts the logits to float32 inside; everything else is float64
    report = assert_equivalent(model.eval(), x, 2, parallel=_sp, atol=1e-10, rtol=1e-6)
    assert report.largest("grad:") < 1e-6
    # Megatron's collectives: GPT-2's Conv1D reads [B*T, C] and its partial output is
    # viewed back to [B, T, C] before the reduce-scatter, so it splits the sequence too
    sim = _sp(model.double(), 2, x)
    with autotp.count_collectives() as log:
        sim(**x).loss.backward()
    assert log.count("forward", "reduce_scatter") == log.count("backward", "reduce_scatter") == 5
    assert log.count("forward", "all_gather") == 6  # 2 a layer, the output layer, the logits
    assert log.count("backward", "all_reduce") == 1  # the parameters' gradients, once


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=model_cases())
def test_drawn_structures_refuse_or_equal_serial_with_sequence_parallelism(case) -> None:
    verdict = check_case(case, sequence_parallel=True)
    assert verdict.ok, f"{verdict}\n\nreproducer:\n{case.reproducer()}"


@pytest.mark.parametrize("seed", [*range(9000, 9010), 30189])  # 30189: no_grad around a block
def test_fuzzed_structures_refuse_or_equal_serial_with_sequence_parallelism(seed: int) -> None:
    case = random_case(seed, tps=(2, 4))
    verdict = check_case(case, sequence_parallel=True)
    assert verdict.ok, f"{verdict}\n\nreproducer:\n{case.reproducer()}"


def _refused_inside_no_grad(rank: int, world: int) -> tuple[str, bool]:
    case = random_case(30189, tps=(2, 4))
    module = autotp.parallelize(case.build(), world, case.inputs(), sequence_parallel=True)
    try:
        module(**case.inputs(sizes=(1, 1)))
        return "ran", torch.is_grad_enabled()
    except AutoTPError as e:
        return str(e).splitlines()[0], torch.is_grad_enabled()


def test_a_refusal_inside_a_no_grad_region_leaves_grad_mode_on() -> None:
    """30189 runs a split block under no_grad; called with a sequence of 1 it is refused
    inside that region, in simulate and on gloo ranks. Grad mode stays on (it stayed
    off for the whole process, and every later model computed without gradients)."""
    case = random_case(30189, tps=(2, 4))
    sim = autotp.simulate(case.build(), 2, case.inputs(), sequence_parallel=True)
    with pytest.raises(AutoTPError, match="multiple of tp"):
        sim(**case.inputs(sizes=(1, 1)))
    assert torch.is_grad_enabled()
    for what, grad in run_on_gloo(_refused_inside_no_grad, 2):
        assert "multiple of tp" in what and grad


def test_a_fuzzed_structure_on_gloo_ranks_with_sequence_parallelism() -> None:
    case = random_case(9003, tps=(2,))
    verdict = check_case_gloo(case, sequence_parallel=True)
    assert verdict.ok, f"{verdict}\n\nreproducer:\n{case.reproducer()}"


def test_the_printed_plan_lists_the_collectives_that_run() -> None:
    """report.communication (what `print(plan)` shows) names each collective that runs,
    by kind and direction, and sequence parallelism moves on a ring what all-reduces
    would, but for the parameters' gradients, the positions' part and the blocks' inputs
    gathered again in backward."""
    from autotp.show import report

    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=2)
    x = model.example_inputs()
    sim = _sp(model, 2, x)
    with autotp.count_collectives() as log:
        sim(**x)[1].backward()
    rows = report.communication(sim.plan)
    assert sorted((r.kind, r.direction) for r in rows) == sorted(e[:2] for e in log.events)
    plain = report.communication(autotp.plan(model, 2, x))
    ring = [sum(r.ring_bytes(2) for r in rs) for rs in (rows, plain)]
    regathered = [r for r in rows if (r.kind, r.direction) == ("all_gather", "backward")
                  and r.node.startswith("gather")]  # fmt: skip
    extra = [r for r in rows if r.rule == "propagation" or r.node.startswith("scatter")]
    extra += regathered
    assert ring[0] == pytest.approx(ring[1] + sum(r.ring_bytes(2) for r in extra))


class _ChangedInPlace(torch.nn.Module):
    """A value read whole by a split block is first changed in place (`m.mul_`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.fc, self.proj = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.fc2, self.proj2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.proj(torch.relu(self.fc(self.ln(x))))
        m = self.ln(h).cumsum(1)  # mixes the tokens: read whole
        m.mul_(0.5)
        return h + self.proj2(torch.relu(self.fc2(m)))


@pytest.mark.parametrize("sp", [False, True])
def test_a_value_changed_in_place_before_a_split_block_reads_it(sp: bool) -> None:
    """f (and the all-gather) go after the in-place change, which the block reads."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    parallel = lambda m, tp, i: autotp.simulate(m, tp, i, sequence_parallel=sp)  # noqa: E731
    assert assert_equivalent(_ChangedInPlace(), (x,), 2, parallel=parallel).largest() < 1e-10


class _Blocks(torch.nn.Module):
    """Two MLP blocks, the value between them changed in place by an op with no table
    entry (`relu_`) or through a view (`y[:, :, 0] = 0`)."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.ln = torch.nn.ModuleList([torch.nn.LayerNorm(8) for _ in range(2)])
        self.fc = torch.nn.ModuleList([torch.nn.Linear(8, 32) for _ in range(2)])
        self.proj = torch.nn.ModuleList([torch.nn.Linear(32, 8) for _ in range(2)])

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj[i](torch.nn.functional.gelu(self.fc[i](self.ln[i](x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(0, x) + 0
        if self.change == "relu_":
            y.relu_()
        elif self.change == "setitem":
            y[:, :, 0] = 0.0
        elif self.change == "movedim":  # through views no table entry knows
            y.movedim(1, 2)[:, 0].zero_()
        else:  # the base changed after a view of it was read whole
            a = y.view(y.shape)[:, 0]
            y.mul_(2)
            y = y + a[:, None]
        return self.block(1, y)


@pytest.mark.parametrize("change", ["relu_", "setitem", "movedim", "base"])
def test_a_sequence_split_changed_in_place_is_never_read_through_a_gathered_copy(
    change: str,
) -> None:
    """The change must reach the value itself: a node that cannot take the split is not
    given a gathered copy of a value changed in place (its block stays replicated)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    assert assert_equivalent(_Blocks(change), (x,), 2, parallel=_sp).largest() < 1e-10


class _Mixed(torch.nn.Module):
    """A float32 norm between float64 blocks, and a length read from a split value
    returned as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = _Blocks("none").double()
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        h = self.blocks.block(0, x)
        return self.blocks.block(1, self.norm(h.float()).double()), h.size(1)


def test_parameters_of_two_dtypes_and_a_returned_length() -> None:
    """One all-reduce of the parameters' gradients per dtype; the length is the serial one."""
    torch.manual_seed(0)
    model, x = _Mixed(), torch.randn(2, 8, 8, dtype=torch.float64)
    sim = _sp(model, 2, (x,))
    (out, length), (want, serial_length) = sim(x), model(x)
    out.sum().backward()
    want.sum().backward()
    assert length == serial_length == 8 and torch.allclose(out, want, rtol=0, atol=1e-6)
    grads = autotp.full_grads(sim)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_the_printed_plan_says_when_no_sum_could_be_split_along_the_sequence() -> None:
    model = build("gpt2-tiny", n_layer=1)
    ids = torch.randint(0, 100, (2, 5))  # 5 tokens: tp=2 cannot share them
    p = autotp.plan(model, 2, {"idx": ids, "targets": ids}, sequence_parallel=True)
    assert "reduce_scatter" not in p.collectives()
    assert "sequence parallel asked for, but no sum could be split" in str(p)
