"""The plan of a transformers model is made of regions (its layers, its input embedding
and its output head), and it is the plan that runs: `autotp.plan` prints it, and
`parallelize`/`simulate` build from it, with the same fingerprint; the vocabulary is split
in this form too."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import llama

import autotp
from autotp.show.report import regions_json
from autotp.testing import assert_equivalent, run_on_gloo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 256  # a multiple of 128 x tp: no padded rows, as in the models people load


def _llama(hidden: int = 32, meta: bool = False) -> torch.nn.Module:
    return llama(vocab=VOCAB, hidden=hidden, meta=meta)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_the_printed_plan_is_the_plan_that_runs() -> None:
    """Planned on the meta device, printed, then built over a model with weights: the
    module runs that plan and equals serial (and planning the real model gives the
    fingerprint building it does); the vocabulary is split, with its collectives listed."""
    plan = autotp.plan(_llama(meta=True), 2)
    assert isinstance(plan, autotp.RegionPlan)
    text = str(plan)
    for part in ("model.layers.0 ..", "(x2)", "model.embed_tokens", "lm_head", "swiglu",
                 "vocab_embedding", "(gathered)", plan.fingerprint):  # fmt: skip
        assert part in text, part
    assert [len(g) for g in plan.groups()] == [2, 1, 1]
    assert [r.kind for r in plan.regions] == ["layer", "layer", "embedding", "head"]
    assert plan.regions[0].patterns is plan.regions[1].patterns  # one program, planned once
    assert plan.splits["model.embed_tokens.weight"].dim == 0
    assert plan.splits["lm_head.weight"].dim == 0
    assert plan.split_fraction() > 0.97
    model = _llama()
    sim = autotp.simulate(model, plan)
    assert sim.autotp_plan is plan
    # planning a model and building it plan alike (on meta, the model's Python is traced,
    # not run, so its first call to a layer may be another call pattern)
    assert autotp.simulate(model, 2).autotp_plan.fingerprint == autotp.plan(model, 2).fingerprint
    shard = sim.model.embed_tokens.ranks[0].weight
    assert shard.shape == (VOCAB // 2, 32)
    report = assert_equivalent(model, _batch(), 2, atol=1e-10, rtol=1e-6,
                               parallel=lambda m, t, x: autotp.simulate(m, plan))  # fmt: skip
    assert report.worst(1)[0][1] < 1e-6
    data = json.loads(json.dumps(regions_json(plan)))
    assert data["fingerprint"] == plan.fingerprint
    assert [r["program"] for r in data["regions"]] == [0, 0, 1, 2]


def test_with_sequence_parallelism_the_printed_plan_shows_the_handed_over_pattern() -> None:
    """With sequence_parallel=True a prompt's layers take their input handed over split
    along the sequence: the plan has that pattern before any call (printed, counted,
    in the fingerprint), and a prompt then plans nothing new."""
    model = _llama()  # with weights: planned from a run of it (on meta, from a trace)
    plan = autotp.plan(model, 2, sequence_parallel=True)
    layer, embedding = plan.regions[0], plan.regions[2]
    ins, outs = layer.boundary()
    assert (
        ins[0]
        == outs[0]
        == str(
            layer.plan.propagation.placements[
                next(n for n in layer.plan.traced.gm.graph.nodes if n.op == "placeholder")
            ]
        )
    )
    assert ins[0].startswith("S(1") and embedding.boundary()[1][0].endswith("(reduce-scattered)")
    assert plan.collectives()["reduce_scatter"] == 1 + 2 * 2  # Megatron's: embedding, 2 a layer
    planned = {k: len(v) for k, v in layer.patterns.plans.items()}
    sim = autotp.simulate(model, plan)
    with torch.no_grad():
        # the call planned: token ids alone, with the model's own defaults (its cache on;
        # use_cache=False or a padding mask is another pattern)
        sim(input_ids=_batch()["input_ids"][:, :6])
    assert {k: len(v) for k, v in layer.patterns.plans.items()} == planned  # nothing new
    assert "as a prompt runs it" in str(plan)


def test_a_model_planned_on_meta_plans_nothing_at_its_first_call() -> None:
    """On meta the model's Python is traced, where transformers cannot read a value and
    so builds a full mask, and the planning run keeps the model's own defaults (its cache
    on): the layers' pattern planned there is the one a real call of token ids (with an
    all-ones mask, as a tokenizer gives) makes, so that call plans nothing new and is
    equal to serial."""
    plan = autotp.plan(_llama(meta=True), 2)
    layer = plan.regions[0]
    planned = {k: len(v) for k, v in layer.patterns.plans.items()}
    model = _llama()
    sim = autotp.simulate(model, plan)
    batch = _batch()
    with torch.no_grad():
        got = sim(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert {k: len(v) for k, v in layer.patterns.plans.items()} == planned  # nothing new
    assert (got.logits - want.logits).abs().max() < 1e-10


def test_a_plan_for_another_model_is_refused() -> None:
    plan = autotp.plan(_llama(hidden=32, meta=True), 2)
    with pytest.raises(autotp.AutoTPError, match="this plan was made for"):
        autotp.simulate(_llama(hidden=64), plan)
    with pytest.raises(autotp.AutoTPError, match="already fixes"):
        autotp.simulate(_llama(), plan, _batch())


def test_the_graph_form_is_asked_for_by_name_and_names_the_region_form_when_it_fails() -> None:
    """A transformers model is planned by regions, with sequence parallelism too (the
    split sequence handed from layer to layer); the whole-graph form only by name."""
    model = _llama()
    model.config.use_cache = True  # as from_pretrained gives it: the cache is returned
    assert isinstance(autotp.plan(model, 2, sequence_parallel=True), autotp.RegionPlan)
    with pytest.raises(autotp.AutoTPError, match='form="regions"') as info:
        autotp.plan(model, 2, form="graph", sequence_parallel=True)  # it cannot trace
    assert "use_cache = False" in str(info.value)
    model.config.use_cache = False  # the whole graph returns no cache object
    assert isinstance(autotp.plan(model, 2, _batch(), form="graph"), autotp.Plan)
    assert isinstance(autotp.plan(model, 2, form="graph", sequence_parallel=True), autotp.Plan)


def test_tied_embedding_and_head_share_one_shard() -> None:
    """GPT-2 ties its head to its embedding: one shard per rank serves both, its gradient
    is the sum of both uses, and a step keeps them one tensor."""
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    sim = autotp.simulate(model, 2)
    for r in range(2):
        assert sim.transformer.wte.ranks[r].weight is sim.lm_head.ranks[r].weight
    assert_equivalent(model, _batch(), 2, atol=1e-10)


def _loop_on_rank(rank: int, world: int, folder: str) -> dict:
    """parallelize from a plan made on meta with weights from a folder; a training step."""
    model = _llama(meta=True)
    plan = autotp.plan(model, world)
    module = autotp.parallelize(model, plan, weights=folder)
    held = {n: tuple(p.shape) for n, p in module.named_parameters()}
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    out = module(**_batch())
    out.loss.backward()
    opt.step()
    state = autotp.full_state_dict(module)
    return {"loss": out.loss.item(), "held": held, "fingerprint": plan.fingerprint,
            "state": {k: v.clone() for k, v in state.items()}}  # fmt: skip


def test_parallelize_from_a_meta_plan_with_weights_on_gloo(tmp_path) -> None:
    """Each rank holds its slice of the vocabulary (read from the folder), and a step
    equals the serial step."""
    serial = _llama()
    serial.save_pretrained(tmp_path)
    opt = torch.optim.SGD(serial.parameters(), lr=0.1)
    out = serial(**_batch())
    out.loss.backward()
    opt.step()
    results = run_on_gloo(_loop_on_rank, 2, str(tmp_path))
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    for r in results:
        assert r["held"]["model.embed_tokens.weight"] == (VOCAB // 2, 32)
        assert r["held"]["lm_head.weight"] == (VOCAB // 2, 32)
        assert r["loss"] == pytest.approx(out.loss.item(), rel=1e-9)
        for k, v in serial.state_dict().items():
            assert (r["state"][k] - v).abs().max() < 1e-9, k
