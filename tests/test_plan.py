"""Plans: shape constants rewritten by provenance, provenance recorded on every changed
node, planning on the meta device, and a readable summary."""

from __future__ import annotations

import operator

import pytest
import torch

import autotp
from autotp.models import build
from autotp.rewrite.sites import record


def _by_target(plan, name):
    return [n for n in plan.graph.nodes if n.op == "call_method" and n.target == name]


def test_shape_constants_rewritten_by_provenance_not_value() -> None:
    """On nanoGPT's attention: in view(B, T, n_head, C // n_head)
    the literal head count is divided while `C // n_head` (the same literal, the head
    width) is not; the merge view(B, T, C) gets C // tp although it has no literal."""
    model = build("gpt2-tiny", n_layer=1, n_head=4, n_embd=32)
    plan = autotp.plan(model, 2)
    (split,) = _by_target(plan, "split")
    assert split.args[1] == 16  # 32 -> 32 / 2
    views = _by_target(plan, "view")
    heads = [v for v in views if len(v.args) == 5]
    assert len(heads) == 3
    for v in heads:
        assert v.args[3] == 2  # 4 heads -> 2 per rank
        hd = v.args[4]
        assert hd.target is operator.floordiv and hd.args[1] == 4  # C // 4: head width
        assert not record(hd).edits
    (merge,) = [v for v in views if len(v.args) == 4 and record(v).edits]
    c = merge.args[3]
    assert c.target is operator.floordiv and c.args[1] == 2  # C -> C // tp
    assert record(merge).edits == [f"{c.args[0].name} -> {c.args[0].name} // 2"]


def test_literal_head_count_and_width() -> None:
    """BERT spells view(B, T, n_heads, head_dim) with ints: only the head count changes."""
    model = build("bert-tiny", num_hidden_layers=1)  # 4 heads of 8
    plan = autotp.plan(model, 4)
    heads = [v for v in _by_target(plan, "view") if len(v.args) == 5]
    assert [v.args[3:] for v in heads] == [(1, 8)] * 3


def test_every_changed_node_records_its_rule() -> None:
    model = build("gpt2-tiny", n_layer=2)
    plan = autotp.plan(model, 2)
    made = [n for n in plan.graph.nodes if record(n).rule]
    assert {record(n).rule for n in made} == {
        "vocab_embedding", "attention_fused_qkv", "mlp", "lm_head",
        "vocab-parallel cross-entropy", "output",
    }  # fmt: skip
    colls = sorted(record(n).collective for n in plan.graph.nodes if record(n).collective)
    assert colls == ["f"] * 5 + ["g"] * 7 + ["gather", "max"]
    for n in plan.graph.nodes:  # every node knows its placement
        if n.op not in ("output", "get_attr"):
            assert record(n).placement, n


def test_plan_is_pure_and_copies_no_weights() -> None:
    model = build("gpt2-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = autotp.plan(model, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in plan.traced.gm.parameters()} <= ptrs


def test_megatron_8_3b_plans_on_meta_without_weights() -> None:
    with torch.device("meta"):
        model = build("megatron-8.3b")
    plan = autotp.plan(model, 8, model.example_inputs(batch=1, seq=1024))
    assert plan.collectives() == {"f": 2 * 72 + 1, "g": 2 * 72 + 3, "max": 1, "gather": 1}
    assert plan.unmatched == []
    sim = autotp.simulate(model, plan)  # the plan is the currency: not planned twice
    rank = sim.ranks[3]
    assert all(p.is_meta for p in rank.parameters())
    w = rank.get_parameter("transformer.h.0.mlp.c_fc.weight")
    assert tuple(w.shape) == (4 * 3072 // 8, 3072)
    full = autotp.full_state_dict(sim)
    assert tuple(full["transformer.h.71.attn.c_attn.weight"].shape) == (3 * 3072, 3072)


def test_summary_prints_rules_collectives_and_unmatched() -> None:
    text = str(autotp.plan(build("bert-tiny"), 2))
    assert "attention_separate_qkv" in text and "mlp" in text
    assert "2 layers" not in text  # no invented prose; numbers below are counted
    assert "7 all-reduce forward (g), 5 all-reduce backward (f)" in text
    assert "cls.predictions.transform.dense.weight" in text  # the MLM transform stays whole


def _to_meta(x: dict) -> dict:
    return {k: v.to("meta") for k, v in x.items()}


def test_a_plan_made_on_the_meta_device_parallelizes_the_real_model() -> None:
    """The Plan is the currency: plan once without weights, then build any instance's
    ranks from it; it equals serial, and each rank's shards come from the given model."""
    from autotp.testing import assert_equivalent

    real = build("gpt2-tiny").double()
    x = real.example_inputs()
    with torch.device("meta"):
        meta = build("gpt2-tiny").double()
    plan = autotp.plan(meta, 2, _to_meta(x))
    assert_equivalent(real, x, 2, parallel=lambda m, tp, xs: autotp.simulate(m, plan))
    sim = autotp.simulate(real, plan)
    assert torch.equal(
        autotp.full_state_dict(sim)["transformer.h.0.mlp.c_fc.weight"],
        real.state_dict()["transformer.h.0.mlp.c_fc.weight"],
    )


def test_a_plan_refuses_another_model_and_second_options() -> None:
    model = build("gpt2-tiny")
    plan = autotp.plan(model, 2)
    with pytest.raises(autotp.AutoTPError, match="c_attn.bias is absent"):
        autotp.simulate(build("gpt2-tiny", n_layer=3), plan)
    with pytest.raises(autotp.AutoTPError, match="already fixes example_inputs, vocab"):
        autotp.simulate(model, plan, model.example_inputs(), vocab=autotp.VocabOptions())
    with pytest.raises(autotp.AutoTPError, match="tied weights differ"):
        untied = build("gpt2-tiny")
        untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
        autotp.simulate(untied, plan)


def test_rules_are_accepted_wherever_a_plan_is_made() -> None:
    from autotp.rules import DEFAULT_RULES

    mlp_only = [r for r in DEFAULT_RULES if r.name == "mlp"]
    model = build("gpt2-tiny", n_layer=1).double()
    sim = autotp.simulate(model, 2, rules=mlp_only)
    assert [m.rule.name for m in sim.plan.matches] == ["mlp"]
