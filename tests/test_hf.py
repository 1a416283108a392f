"""Models nobody here wrote: transformers' GPT-2, BERT and Llama, through the torch.export
front-end, equal to serial; and the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from hf_models import RTOL_FLOAT32_INSIDE, build, inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import autotp
from autotp.testing import assert_equivalent, run_on_gloo

MODELS = ["gpt2", "bert", "bert-mlm", "llama"]
BLOCK_RULES = {
    "gpt2": ["attention_fused_qkv", "mlp"],
    "bert": ["attention_separate_qkv", "mlp"],
    "bert-mlm": ["attention_separate_qkv", "mlp"],
    "llama": ["attention_separate_qkv", "swiglu"],
}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", MODELS)
def test_equals_serial_float64(name: str, tp: int) -> None:
    model = build(name, heads=8, kv_heads=4 if name == "llama" else None).double()
    x = inputs(name)
    plan = autotp.plan(model, tp, x, form="graph")  # planned once, on the float64 model it checks
    assert plan.traced.frontend == "export"  # transformers 5 cannot be fx-traced
    rules = [m.rule.name for m in plan.matches]
    assert [r for r in rules if r in BLOCK_RULES[name]] == BLOCK_RULES[name] * 2
    has_head = name != "bert"
    assert ("lm_head" in rules) == has_head and ("vocab_embedding" in rules) == has_head
    assert plan.collectives()["f"] == 2 * 2 + has_head
    assert_equivalent(model, x, tp, atol=1e-10, rtol=RTOL_FLOAT32_INSIDE[name],
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip


def test_collectives_counted_as_they_run() -> None:
    model = build("llama", layers=3, heads=4, kv_heads=2)
    x = inputs("llama", batch=3, seq=5)
    sim = autotp.simulate(model, 2, x, vocab=autotp.VocabOptions(gather_outputs=False))
    with autotp.count_collectives() as log:
        sim(**x).loss.backward()
    assert log.count("forward", "all_reduce") == 2 * 3 + 1 + 2
    assert log.count("forward", "all_reduce_max") == 1
    assert log.count("backward", "all_reduce") == 2 * 3 + 1


def test_grouped_query_attention_with_fewer_kv_heads_than_ranks() -> None:
    model = build("llama", heads=4, kv_heads=2)
    assert_equivalent(model, inputs("llama"), 2, atol=1e-10, rtol=1e-6)  # 1 KV head each
    with pytest.raises(autotp.AutoTPError, match="key/value heads") as e:
        autotp.plan(model, 4, inputs("llama"), strict=True, form="graph")
    assert "size 2" in str(e.value) and "modeling_llama.py" in str(e.value)
    # without strict: each key/value head is held by the 2 ranks whose query heads read
    # it; everything else splits as usual
    model = model.double()
    plan = autotp.plan(model, 4, inputs("llama"), form="graph")
    assert not plan.replicated
    attention = [m for m in plan.matches if m.rule.name == "attention_separate_qkv"]
    assert len(attention) == 2
    assert all(sorted(m.layers) == ["k", "out", "q", "v"] for m in attention)
    shared = {n: s.replicas for n, s in plan.splits.items() if s.replicas > 1}
    assert sorted(shared) == [f"model.layers.{i}.self_attn.{p}_proj.weight"
                              for i in (0, 1) for p in "kv"]  # fmt: skip
    assert set(shared.values()) == {2}
    assert {m.rule.name for m in plan.matches} >= {"swiglu"}
    assert_equivalent(model, inputs("llama"), 4, atol=1e-10, rtol=1e-6,
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip


def test_other_batch_sizes_and_lengths_run() -> None:
    """Batch and sequence are exported as dynamic dimensions."""
    model = build("gpt2").double()
    sim = autotp.simulate(model, 2, inputs("gpt2", batch=2, seq=8))
    x = inputs("gpt2", batch=3, seq=13)
    got, want = sim(**x), model(**x)
    assert (got.logits - want.logits).abs().max() < 1e-10


def test_without_example_inputs() -> None:
    """Inputs synthesised from the config: token ids of the vocabulary."""
    for name in ("bert", "llama"):  # an encoder and a decoder config
        plan = autotp.plan(build(name), 2, form="graph")
        assert plan.traced.inputs["input_ids"].shape == (2, 8)
    mod = autotp.parallelize(build("bert"), 1)
    assert mod(input_ids=torch.ones(1, 4, dtype=torch.long)).last_hidden_state.shape == (1, 4, 32)


def test_import_autotp_does_not_import_transformers() -> None:
    code = "import sys, autotp, autotp.models, autotp.rules; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=6)
@given(
    name=st.sampled_from(MODELS),
    tp=st.sampled_from([1, 2, 4]),
    layers=st.integers(1, 2),
    heads_per_rank=st.sampled_from([1, 2]),
    kv_groups=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8]),
    vocab=st.sampled_from([37, 128]),
)
def test_small_configs(name, tp, layers, heads_per_rank, kv_groups, head_dim, vocab) -> None:
    heads = tp * heads_per_rank * kv_groups
    kv = heads // kv_groups if name == "llama" else None
    model = build(name, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim, vocab=vocab)
    assert_equivalent(model, inputs(name, vocab=vocab), tp, atol=1e-10,
                      rtol=RTOL_FLOAT32_INSIDE[name])  # fmt: skip


def _hf_on_rank(rank: int, world: int, name: str, dtype: torch.dtype) -> float:
    model = build(name, heads=4, kv_heads=2 if name == "llama" else None)
    f64 = dtype == torch.float64
    report = assert_equivalent(
        model, inputs(name), world, dtype=dtype,
        atol=1e-10 if f64 else 1e-6, rtol=RTOL_FLOAT32_INSIDE[name] if f64 else 1e-5,
        parallel=lambda m, tp, x: autotp.parallelize(m, tp, x),
    )  # fmt: skip
    return report.largest()


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("gpt2", torch.float32), ("bert", torch.float64), ("bert-mlm", torch.float32),
     ("llama", torch.float64), ("llama", torch.float32)],
    ids=["gpt2-f32", "bert-f64", "bert-mlm-f32", "llama-f64", "llama-f32"],
)  # fmt: skip
def test_on_gloo(name: str, dtype: torch.dtype) -> None:
    run_on_gloo(_hf_on_rank, 2, name, dtype)


def _more(name: str) -> torch.nn.Module:
    """Architectures whose structures autotp learned from the coverage table."""
    t = __import__("transformers")
    torch.manual_seed(0)
    small = {"vocab_size": 101, "use_cache": False}
    if name == "gpt_neox":  # q, k, v adjacent per head; parallel attention + MLP
        cfg = t.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0,
                              max_position_embeddings=64, **small)  # fmt: skip
        return t.GPTNeoXForCausalLM(cfg)
    if name == "gptj":  # interleaved rotary through torch.stack; parallel block
        cfg = t.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **small)  # fmt: skip
        return t.GPTJForCausalLM(cfg)
    gqa = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, **small}  # fmt: skip
    if name == "phi3":  # fused q|k|v sliced into unequal parts; fused gate|up
        return t.Phi3ForCausalLM(t.Phi3Config(pad_token_id=0, **gqa))
    if name == "mixtral":  # routed experts: bmm(gate_up_proj[ids], x), router replicated
        # transformers' default grouped_mm kernel is a custom op without float64 (and
        # autotp refuses it, naming this option)
        cfg = t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                              experts_implementation="batched_mm", **gqa)  # fmt: skip
        return t.MixtralForCausalLM(cfg)
    cfg = t.CohereConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, **small)  # fmt: skip
    return t.CohereForCausalLM(cfg)  # parallel block without dropout: one all-reduce


@pytest.mark.parametrize(
    ("name", "blocks", "g"),
    [("gpt_neox", ["attention_per_head_qkv"], 7), ("gptj", ["attention_separate_qkv"], 7),
     ("cohere", ["attention_separate_qkv"], 5),
     ("phi3", ["attention_sliced_qkv", "swiglu_fused"], 7),
     ("mixtral", ["attention_separate_qkv", "swiglu_fused"], 7)],
)  # fmt: skip
@pytest.mark.slow
def test_more_architectures_split_and_equal_serial(name: str, blocks: list, g: int) -> None:
    """g counts 2 per layer where a dropout reads a biased partial output (GPT-J, NeoX),
    1 per layer for Cohere's parallel block; plus the embedding and the loss's two.
    Mixtral's experts split like a fused gated MLP; its router stays replicated."""
    model = _more(name).double()
    ids = torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "labels": ids}
    plan = autotp.plan(model, 2, x, form="graph")
    assert not plan.replicated
    assert all([m.rule.name for m in plan.matches].count(b) == 2 for b in blocks)
    assert plan.collectives()["g"] == g
    assert_equivalent(model, x, 2, atol=1e-10, rtol=1e-6,  # rotary tables in float32
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip


def test_default_moe_kernel_is_refused_naming_the_option_that_splits_it() -> None:
    t = __import__("transformers")
    cfg = t.MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                          vocab_size=101, use_cache=False)  # fmt: skip
    ids = torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(autotp.AutoTPError, match='experts_implementation="batched_mm"'):
        autotp.plan(t.MixtralForCausalLM(cfg), 2, {"input_ids": ids}, form="graph")


QKV = "model.layers.0.self_attn.qkv_proj.weight"


def _phi3_loop(rank: int, world: int) -> dict:
    """The user's loop on a Phi-3 whose fused Q|K|V has fewer key/value heads than ranks:
    clipped gradients (the norm counts each shared head once), an AdamW step; the serial
    model runs the same loop on every rank."""
    serial = _more("phi3").double()
    par = autotp.parallelize(copy.deepcopy(serial), world)
    ids = torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, m in (("serial", serial), ("parallel", par)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        grads = autotp.full_grads(m) if m is par else {
            k: p.grad for k, p in m.named_parameters()}  # fmt: skip
        opt.step()
        state = autotp.full_state_dict(m) if m is par else m.state_dict()
        out[name] = (loss.item(), norm.item(), dict(grads), dict(state))
    return {"split": str(par.autotp_plan.splits[QKV]), **out}


def test_a_fused_qkv_with_fewer_kv_heads_than_ranks_shares_each_head() -> None:
    """Phi-3's fused Q|K|V with 2 key/value heads at tp=4: the query part is split over
    the 4 ranks and each key/value head held by the 2 ranks whose query heads read it
    (their weight gradients summed, counted once in the norm), nothing replicated; equal
    to serial simulated and on 4 gloo ranks through a clipped AdamW step."""
    model = _more("phi3").double()
    ids = torch.randint(1, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    plan = autotp.plan(model, 4)
    assert str(plan.splits[QKV]) == "S(0 in parts 32|16|16, held by 1|2|2 ranks)"
    assert not any(r.plan.replicated for r in plan.regions)
    assert plan.split_fraction() > 0.97
    assert_equivalent(model, {"input_ids": ids, "labels": ids}, 4, atol=1e-10, rtol=1e-6,
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip
    got = run_on_gloo(_phi3_loop, 4)
    for rank in got:
        assert rank["split"] == str(plan.splits[QKV])
        (loss_s, norm_s, grads_s, state_s), (loss_p, norm_p, grads_p, state_p) = (
            rank["serial"], rank["parallel"])  # fmt: skip
        assert norm_s > 0.5  # clipped
        assert abs(loss_s - loss_p) < 1e-10 and abs(norm_s - norm_p) < 1e-10
        assert max((grads_s[k] - grads_p[k]).abs().max().item() for k in grads_s) < 1e-10
        assert max((state_s[k] - state_p[k]).abs().max().item() for k in state_s) < 1e-10
