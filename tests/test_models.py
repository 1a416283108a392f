"""Reference models: they run, tie, trace, keep the public names, and build on meta."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx

from autotp.models import (
    CONFIGS,
    GPT2,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    build,
    names,
)

TINY = ["gpt2-tiny", "gpt2-tiny-flash", "bert-tiny", "bert-tiny-preln"]


class Tracer(torch.fx.Tracer):
    proxy_buffer_attributes = True  # the causal mask `attn.bias` is a buffer


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name).double().eval()


def target_key(model: torch.nn.Module) -> str:
    return "targets" if isinstance(model, GPT2) else "labels"


def expected_gpt2_keys(cfg: GPT2Config) -> set[str]:
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    keys |= {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(cfg.n_layer):
        for mod in ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]:
            keys |= {f"transformer.h.{i}.{mod}.weight", f"transformer.h.{i}.{mod}.bias"}
    return keys


def expected_bert_keys(cfg: BertConfig) -> set[str]:
    e = "bert.embeddings"
    keys = {f"{e}.{n}.weight" for n in ["word_embeddings", "position_embeddings"]}
    keys |= {f"{e}.token_type_embeddings.weight", f"{e}.LayerNorm.weight", f"{e}.LayerNorm.bias"}
    for i in range(cfg.num_hidden_layers):
        for mod in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ]:
            keys |= {f"bert.encoder.layer.{i}.{mod}.weight", f"bert.encoder.layer.{i}.{mod}.bias"}
    if cfg.pre_ln:
        keys |= {"bert.encoder.final_layer_norm.weight", "bert.encoder.final_layer_norm.bias"}
    p = "cls.predictions"
    keys |= {f"{p}.transform.dense.weight", f"{p}.transform.dense.bias"}
    keys |= {f"{p}.transform.LayerNorm.weight", f"{p}.transform.LayerNorm.bias"}
    keys |= {f"{p}.decoder.weight", f"{p}.bias"}
    return keys


@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_float64(name: str, with_target: bool) -> None:
    model = tiny(name)
    kwargs = model.example_inputs(**{target_key(model): with_target})
    logits, loss = model(**kwargs)
    first = next(iter(kwargs.values()))
    assert logits.shape == (*first.shape, model.config.vocab_size)
    assert logits.dtype == torch.float64
    assert torch.isfinite(logits).all()
    if not with_target:
        assert loss is None
        return
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 1.0  # near uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_tied_weights_are_one_parameter(name: str) -> None:
    model = build(name)
    if isinstance(model, GPT2):
        assert model.transformer.wte.weight is model.lm_head.weight
    else:
        emb = model.bert.embeddings.word_embeddings.weight
        assert model.cls.predictions.decoder.weight is emb
    names_of = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names_of) == len({id(p) for p in model.parameters()}) + 1  # one shared


@pytest.mark.parametrize("name", TINY)
def test_state_dict_uses_public_names(name: str) -> None:
    model = build(name)
    cfg = model.config
    expected = expected_gpt2_keys(cfg) if isinstance(cfg, GPT2Config) else expected_bert_keys(cfg)
    assert set(model.state_dict()) == expected


TRACE_CASES = [
    ("gpt2-tiny", {"targets": None}),
    ("gpt2-tiny", {}),
    ("gpt2-tiny-flash", {"targets": None}),
    ("gpt2-tiny-flash", {}),
    ("bert-tiny", {}),
    ("bert-tiny", {"labels": None}),
    ("bert-tiny", {"attention_mask": None, "token_type_ids": None, "labels": None}),
    ("bert-tiny-preln", {}),
    ("bert-tiny-preln", {"labels": None}),
]


@pytest.mark.parametrize(("name", "concrete"), TRACE_CASES)
def test_symbolic_trace_matches_model(name: str, concrete: dict[str, None]) -> None:
    model = tiny(name)
    graph = Tracer().trace(model, concrete_args=concrete or None)
    graph.lint()
    gm = torch.fx.GraphModule(model, graph)
    kwargs = {k: v for k, v in model.example_inputs().items() if k not in concrete}
    want_logits, want_loss = model(**kwargs)
    got_logits, got_loss = gm(**kwargs)
    assert torch.equal(got_logits, want_logits)
    if want_loss is None:
        assert got_loss is None
    else:
        assert torch.equal(got_loss, want_loss)


def test_megatron_8_3b_builds_on_meta_without_allocating() -> None:
    with torch.device("meta"):
        model = build("megatron-8.3b")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 8.3e9) / 8.3e9 < 0.03, n
    inputs = model.example_inputs()
    assert all(t.is_meta and t.dtype == torch.long for t in inputs.values())


def test_gpt2_small_has_124m_parameters() -> None:
    with torch.device("meta"):
        model = build("gpt2")
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_post_ln_and_pre_ln_bert_differ_in_structure() -> None:
    post, pre = tiny("bert-tiny"), tiny("bert-tiny-preln")
    assert set(pre.state_dict()) - set(post.state_dict()) == {
        "bert.encoder.final_layer_norm.weight",
        "bert.encoder.final_layer_norm.bias",
    }
    assert set(post.state_dict()) <= set(pre.state_dict())

    def module_order(model: torch.nn.Module) -> list[str]:
        graph = Tracer().trace(model, concrete_args={"labels": None})
        return [n.target for n in graph.nodes if n.op == "call_module"]

    ln, query = (
        "bert.encoder.layer.0.attention.output.LayerNorm",
        "bert.encoder.layer.0.attention.self.query",
    )
    post_order, pre_order = module_order(post), module_order(pre)
    assert post_order.index(query) < post_order.index(ln)  # layer norm after the sub-block
    assert pre_order.index(ln) < pre_order.index(query)  # layer norm at the sub-block input
    final = pre_order.index("bert.encoder.final_layer_norm")  # after the last layer
    assert all(t.startswith("cls.") for t in pre_order[final + 1 :])
    assert "bert.encoder.final_layer_norm" not in post_order

    # same weights, different function
    pre.load_state_dict(post.state_dict(), strict=False)
    kwargs = post.example_inputs(labels=False)
    assert not torch.allclose(pre(**kwargs)[0], post(**kwargs)[0])


def test_example_inputs_shapes_and_masks() -> None:
    model = build("bert-tiny")
    inputs = model.example_inputs(batch=3, seq=8)
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    mask, labels = inputs["attention_mask"], inputs["labels"]
    assert (mask.sum(dim=1) >= 1).all() and (mask == 0).any()
    assert (labels == -100).any() and (labels != -100).any(dim=1).all()
    assert (labels[mask == 0] == -100).all()
    assert list(model.example_inputs(mask=False, labels=False)) == ["input_ids", "token_type_ids"]

    gpt = build("gpt2-tiny")
    assert list(gpt.example_inputs()) == ["idx", "targets"]
    assert list(gpt.example_inputs(targets=False)) == ["idx"]
    assert torch.equal(gpt.example_inputs()["idx"], gpt.example_inputs()["idx"])  # seeded


def test_registry() -> None:
    assert names() == list(CONFIGS)
    assert isinstance(build("bert-tiny"), BertForMaskedLM)
    assert isinstance(build("gpt2-tiny"), GPT2)
    assert build("gpt2-tiny", n_layer=3).config.n_layer == 3
    assert CONFIGS["gpt2-tiny"].n_layer == 2  # overrides leave the registry alone
    assert CONFIGS["megatron-bert-3.9b"].pre_ln and not CONFIGS["bert-large"].pre_ln
    with pytest.raises(ValueError, match="gpt2-tiny") as err:
        build("gpt3")
    assert isinstance(err.value, KeyError)
    with pytest.raises(TypeError, match="n_embed"):
        build("gpt2-tiny", n_embed=64)
    with pytest.raises(ValueError, match="divisible"):
        build("gpt2-tiny", n_head=5)
