"""transformers models as users hold them: default configs (use_cache=True), every keyword
of the model's forward, its output types, and generate(), through the region form (each
decoder layer replaced by its parallel form, the model's own Python kept around it)."""

from __future__ import annotations

import pytest
import torch

import autotp
from autotp.testing import assert_equivalent, run_on_gloo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 97


def _model(name: str, kv_heads: int = 4, seed: int = 0) -> torch.nn.Module:
    """A small model from a config left at its defaults but for its sizes (use_cache=True,
    dropout as configured, sdpa attention)."""
    torch.manual_seed(seed)
    sizes = {"vocab_size": VOCAB}
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **sizes)
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=kv_heads, max_position_embeddings=64, **sizes,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, **sizes,
        )  # fmt: skip
        model = transformers.BertForMaskedLM(cfg)
    assert name == "bert" or model.config.use_cache  # the default the issue is about
    return model.double().eval()


def _batch(seq: int = 6, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :2] = 0  # left padding, as generate() batches prompts
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(("name", "tp", "kv"), [("gpt2", 2, 4), ("llama", 2, 2), ("llama", 4, 2)])
def test_default_config_equals_serial_with_the_keywords_people_use(name, tp, kv) -> None:
    """Planned from nothing but the model; called with input_ids, attention_mask and labels
    (and, for llama at tp=4, two key/value heads for four ranks: each held by the two
    ranks whose query heads read it)."""
    model = _model(name, kv)
    x = _batch()
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    report = assert_equivalent(model, x, tp, atol=1e-10, rtol=1e-6)  # float32 RMSNorm inside
    assert report.worst(1)[0][1] < 1e-6
    sim = autotp.simulate(model, tp)
    out = sim(**x)
    assert type(out) is type(model(**x))  # CausalLMOutputWithPast, logits gathered
    assert out.logits.shape == (2, 6, VOCAB)


def test_keywords_the_plan_never_saw() -> None:
    """Planned without inputs; then position_ids, use_cache, output_hidden_states and a past
    passed back in all work as in the serial model."""
    model = _model("llama", 2)
    sim = autotp.simulate(model, 2)
    x = _batch(pad=False)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        a = model(**x, position_ids=pos, use_cache=True, output_hidden_states=True)
        b = sim(**x, position_ids=pos, use_cache=True, output_hidden_states=True)
        assert len(a.hidden_states) == len(b.hidden_states)
        assert (a.logits - b.logits).abs().max() < 1e-12
        nxt = torch.full((2, 1), 5)
        a2 = model(input_ids=nxt, cache=a.past_key_values)
        b2 = sim(input_ids=nxt, cache=b.past_key_values)
    assert (a2.logits - b2.logits).abs().max() < 1e-12


def test_masked_lm_takes_attention_mask_when_planned_without_it() -> None:
    model = _model("bert")
    x = _batch()
    x["labels"] = x["input_ids"].clone()
    report = assert_equivalent(model, x, 2, atol=1e-10)
    assert report.worst(1)[0][1] < 1e-10


@pytest.mark.parametrize(("name", "tp", "kv"), [("gpt2", 2, 4), ("llama", 2, 2), ("llama", 4, 2)])
def test_generate_greedy_and_sampled_equal_serial(name, tp, kv) -> None:
    model = _model(name, kv)
    sim = autotp.simulate(model, tp)
    x = _batch()
    kw = {"max_new_tokens": 5, "pad_token_id": 0}
    want = model.generate(**x, do_sample=False, **kw)
    got = sim.generate(**x, do_sample=False, **kw)
    assert torch.equal(want, got)
    torch.manual_seed(7)
    want = model.generate(**x, do_sample=True, top_k=20, **kw)
    torch.manual_seed(7)
    got = sim.generate(**x, do_sample=True, top_k=20, **kw)
    assert torch.equal(want, got)


def test_collectives_per_layer_are_megatrons() -> None:
    """Two all-reduces forward and two backward per decoder layer; the vocabulary-split
    embedding adds one forward (its rows summed), the head one backward (f) and the
    logits' gather; nothing else, each of batch x seq x hidden elements but the gather."""
    model = _model("llama", 2)
    sim = autotp.simulate(model, 2)
    x = _batch()
    x["labels"] = x["input_ids"]
    with autotp.count_collectives() as log:
        sim(**x).loss.backward()
    assert log.count("forward", "all_reduce") == 2 * 2 + 1
    assert log.count("backward", "all_reduce") == 2 * 2 + 1
    assert log.count("forward", "all_gather") == 1
    assert len(log.events) == 11
    assert {n for kind, _, n in log.events if kind == "all_reduce"} == {2 * 6 * 32}


def _generate_on_rank(rank: int, world: int, name: str, kv: int) -> tuple:
    model = _model(name, kv)
    module = autotp.parallelize(model, world)
    x = _batch()
    out = module.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True)  # fmt: skip
    torch.manual_seed(11)
    sampled = module.generate(**x, max_new_tokens=5, do_sample=True, pad_token_id=0)
    keys = out.past_key_values.layers[0].keys
    want = model.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return out.sequences.tolist(), want.tolist(), tuple(keys.shape), sampled.tolist()


@pytest.mark.parametrize(("name", "kv"), [("gpt2", 4), ("llama", 2)])
def test_generate_on_gloo_ranks(name, kv) -> None:
    """Real processes: greedy tokens equal serial, sampling draws the same tokens on every
    rank, and each rank's cache holds its own key/value heads only."""
    results = run_on_gloo(_generate_on_rank, 2, name, kv)
    for got, want, keys, _ in results:
        assert got == want
        assert keys[1] == kv // 2
    assert results[0][3] == results[1][3]


def _shared_kv_on_rank(rank: int, world: int) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    model = _model("llama", 2)  # 4 query heads, 2 key/value heads, on 4 ranks
    module = autotp.parallelize(model, world)
    x = _batch()
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    module(**x)  # the first call plans the layers
    with CommDebugMode() as cdm:
        loss = module(**x).loss
        loss.backward()
    counts = {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
    torch.optim.AdamW(module.parameters(), lr=1e-2).step()
    full = autotp.full_state_dict(module)
    k = dict(module.named_parameters())["model.layers.0.self_attn.k_proj.weight"]
    out = module.generate(**_batch(), max_new_tokens=4, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True)  # fmt: skip
    keys = out.past_key_values.layers[0].keys
    return {"loss": loss.item(), "norm": norm.item(), "full": full, "counts": counts,
            "k": k.detach().clone(), "tokens": out.sequences.tolist(),
            "keys": tuple(keys.shape)}  # fmt: skip


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # CommDebugMode's hooks
@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
@pytest.mark.slow
def test_fewer_key_value_heads_than_ranks_on_gloo_ranks() -> None:
    """2 key/value heads on 4 real ranks: each rank computes the key/value head its query
    heads read, ranks 0-1 and 2-3 hold one each, and sum their gradients of it in one
    all-reduce per layer (beside Megatron's 2 + 2 per layer, the embedding's forward
    all-reduce and the head's backward one). Loss, clipped norm, the weights after an
    AdamW step and generated tokens equal serial; a rank's cache holds its one head."""
    model = _model("llama", 2)
    x = _batch()
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    loss = model(**x).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    want = model.generate(**_batch(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    results = run_on_gloo(_shared_kv_on_rank, 4)
    for r in results:
        assert r["counts"] == {"allreduce_": 2 * 2 + 1 + 2 * 2 + 1 + 2, "allgather_": 1}
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert r["norm"] == pytest.approx(norm.item(), rel=1e-6)
        for name, t in model.state_dict().items():
            assert (r["full"][name] - t).abs().max() < 1e-6, name
        assert r["tokens"] == want.tolist() and r["keys"][1] == 1
    assert torch.equal(results[0]["k"], results[1]["k"])
    assert torch.equal(results[2]["k"], results[3]["k"])
    assert not torch.equal(results[1]["k"], results[2]["k"])


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
@pytest.mark.slow
def test_sequence_parallel_hands_the_split_sequence_over_between_layers(name) -> None:
    """form="regions", sequence_parallel=True: each layer returns its hidden state split
    along the sequence (a HandedOver of the serial shape, holding the rank's part), the
    model's Python passes it on and the next layer takes the part as it is; the final
    norm (or head) reads it gathered. Equal to serial in float64 at tp 2 and 4 (outputs,
    loss, every gradient, a step). Forward, Megatron's collectives: the embedding's sum
    reduce-scattered, per layer 2 reduce-scatters and 2 all-gathers, one all-gather where
    the model's Python reads the last layer's output, and the logits' (GPT-2 adds its
    positions to the embedding's output in its own Python: gathered there, and its first
    layer cuts its input instead of gathering it)."""
    model = _model(name, 2 if name == "llama" else 4)
    x = _batch(seq=8)
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    for tp in (2, 4):
        assert_equivalent(model, x, tp, atol=1e-10, rtol=1e-6,
                          parallel=lambda m, t, _: autotp.simulate(
                              m, t, form="regions", sequence_parallel=True))  # fmt: skip
    sim = autotp.simulate(model, 2, form="regions", sequence_parallel=True)
    layers = {"gpt2": lambda: sim.transformer.h, "bert": lambda: sim.bert.encoder.layer,
              "llama": lambda: sim.model.layers}[name]()  # fmt: skip
    seen = []
    layers[1].register_forward_pre_hook(lambda m, a: seen.append(type(a[0]).__name__))
    with autotp.count_collectives() as log:
        sim(**x).loss.backward()
    assert seen == ["HandedOver"]
    if name != "bert":
        assert log.count("forward", "all_reduce") == 0
        assert log.count("forward", "reduce_scatter") == 1 + 2 * 2
        assert log.count("forward", "all_gather") == 2 * 2 + 1 + 1


def _handed_over_on_rank(rank: int, world: int) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    model = _model("llama", 2)
    module = autotp.parallelize(model, world, form="regions", sequence_parallel=True)
    x = _batch(seq=8)
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    module(**x)  # the first call plans the layers' patterns
    with CommDebugMode() as cdm:
        loss = module(**x).loss
        forward = {str(k).split(".")[-1]: v for k, v in cdm.get_comm_counts().items()}
        loss.backward()
    grads = autotp.full_grads(module)
    tokens = module.generate(**_batch(seq=8), max_new_tokens=4, do_sample=False, pad_token_id=0)
    return {"loss": loss.item(), "forward": forward, "grads": grads, "tokens": tokens.tolist()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # CommDebugMode's hooks
@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
def test_sequence_parallel_between_layers_on_gloo_ranks() -> None:
    """Real ranks, under CommDebugMode (whose module hooks see the hand-over's part):
    loss, every gradient and greedy tokens equal serial; forward 5 reduce-scatters (the
    embedding, 2 layers) and 6 all-gathers (2 layers, the last layer's output read by
    the final norm, the logits), no all-reduce."""
    model = _model("llama", 2)
    x = _batch(seq=8)
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    loss = model(**x).loss
    loss.backward()
    want = model.generate(**_batch(seq=8), max_new_tokens=4, do_sample=False, pad_token_id=0)
    for r in run_on_gloo(_handed_over_on_rank, 2):
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
        gathers = r["forward"].pop("_allgather_base_", 0) + r["forward"].pop("allgather_", 0)
        assert (r["forward"], gathers) == ({"_reduce_scatter_base_": 5}, 6)
        for n, p in model.named_parameters():
            assert (r["grads"][n] - p.grad).abs().max() < 1e-6, n
        assert r["tokens"] == want.tolist()


def _doubled(module, args, out) -> None:
    out.mul_(2)  # a forward hook writing the layer's output in place


def _written_on_rank(rank: int, world: int) -> float:
    module = autotp.parallelize(_model("llama", 2), world, sequence_parallel=True)
    module.model.layers[0].register_forward_hook(_doubled)
    x = _batch(seq=8)
    return module(**x, labels=x["input_ids"]).loss.item()


def test_a_handed_over_hidden_state_written_in_place_is_read_whole_by_the_next_layer() -> None:
    """A hook that doubles a layer's output in place writes the serial tensor (gathered,
    a copy of its own), and the next layer reads that, not the stale part: the loss is
    the serial model's with the same hook."""
    model = _model("llama", 2)
    model.model.layers[0].register_forward_hook(_doubled)
    x = _batch(seq=8)
    want = model(**x, labels=x["input_ids"]).loss.item()
    for got in run_on_gloo(_written_on_rank, 2):
        assert got == pytest.approx(want, rel=1e-9)


def test_train_mode_set_after_parallelizing_turns_dropout_on() -> None:
    """Planned in eval mode (equal to serial); after .train() the layers drop out (two
    calls differ), as the serial model's would: the mode is part of a call's pattern."""
    model = _model("gpt2")  # GPT-2's default dropout, 0.1
    sim = autotp.simulate(model, 2)
    x = _batch(pad=False)
    with torch.no_grad():
        assert (sim(**x).logits - model(**x).logits).abs().max() < 1e-12
        sim.train()
        a, b = sim(**x).logits, sim(**x).logits
    assert (a - b).abs().max() > 1e-3
    sim.activation_checkpointing_enable()  # would recompute with other masks: refused
    with pytest.raises(autotp.AutoTPError, match="gradient_checkpointing_disable"):
        sim(**x).logits.sum().backward()


def test_what_a_parallel_layer_cannot_give_is_refused() -> None:
    """Attentions collected from inside a layer: refused with what to do, never silently
    missing."""
    model = _model("llama", 2)
    model.config._attn_implementation = "eager"
    sim = autotp.simulate(model, 2)
    with pytest.raises(autotp.AutoTPError, match="output_attentions"):
        sim(**_batch(), output_attentions=True)


def test_hooks_on_a_layer_and_the_embedding_come_along() -> None:
    """A forward hook on a layer, a full backward hook on a layer and on the head, and the
    hook gradient checkpointing puts on the input embedding (its output then requires
    grad) see in the parallel model what they see in the serial one. The handle stored in
    the model (transformers') removes its hook from the parallel model; the dicts are
    the parallel model's own."""
    model = _model("llama", 2)
    seen: dict[str, list[torch.Tensor]] = {"serial": [], "parallel": []}
    where = ["serial"]
    model.model.layers[1].register_forward_hook(
        lambda m, a, out: seen[where[0]].append(out[0] if isinstance(out, tuple) else out)
    )
    for module in (model.model.layers[1], model.lm_head):
        module.register_full_backward_hook(lambda m, gi, go: seen[where[0]].append(go[0]))
    model.enable_input_require_grads()
    sim = autotp.simulate(model, 2)
    x = _batch()
    seen["serial"].clear()
    model(**x).logits.sum().backward()
    where[0] = "parallel"
    out = sim(**x)
    out.logits.sum().backward()
    assert len(seen["parallel"]) == len(seen["serial"]) == 3  # forward, head, layer
    for a, b in zip(seen["serial"], seen["parallel"], strict=True):
        assert (a - b).abs().max() < 1e-12
    assert out.logits.requires_grad
    sim.disable_input_require_grads()  # the handle copied with the model
    assert not sim.model.embed_tokens._forward_hooks
    assert model.model.embed_tokens._forward_hooks  # the user's model keeps its own
    sim.model.layers[1]._forward_hooks.clear()
    assert len(model.model.layers[1]._forward_hooks) == 1


def test_a_transformers_model_without_a_vocabulary() -> None:
    """An audio encoder (no token embedding: get_input_embeddings raises) is split layer
    by layer, and its plan says why nothing is split along a vocabulary."""
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
    )  # fmt: skip
    model = transformers.Wav2Vec2Model(cfg).double().eval()
    x = {"input_values": torch.randn(2, 400, dtype=torch.double)}
    plan = autotp.plan(model, 2, x)
    assert [r.kind for r in plan.regions] == ["layer", "layer"]
    assert any("no input embedding" in n for n in plan.notes())
    assert_equivalent(model, x, 2, atol=1e-10,
                      parallel=lambda m, t, xs: autotp.simulate(m, plan))  # fmt: skip


def test_converting_dtype_after_building_follows() -> None:
    """.float() after building: the layers are traced again in the new dtype."""
    model = _model("llama", 2)
    sim = autotp.simulate(model, 2)
    x = _batch()
    sim(**x)
    sim.float()
    model.float()
    with torch.no_grad():
        got, want = sim(**x).logits, model(**x).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-4


def _encoder_decoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "t5":
        cfg = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                    vocab_size=VOCAB, decoder_start_token_id=0)  # fmt: skip
        return transformers.T5ForConditionalGeneration(cfg).double().eval()
    cfg = transformers.BartConfig(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(cfg).double().eval()


@pytest.mark.parametrize("name", ["t5", "bart"])
@pytest.mark.slow
def test_an_encoder_decoder_with_its_default_cache_equals_serial(name: str) -> None:
    """Planned from nothing but the model (its decoder is given ids too); called as users
    train it (labels, the default EncoderDecoderCache) and generating greedily and with
    beams, it gives the serial model's logits and tokens. Each rank's cache holds its own
    heads of the decoder's keys; the encoder's are recomputed at each step. The shared
    vocabulary table (the model's, the encoder's and the decoder's embedding, and the
    tied head) is one shard per rank."""
    model = _encoder_decoder(name)
    sim = autotp.simulate(model, 2)
    base = sim.model if name == "bart" else sim
    tables = [base.shared, base.encoder.embed_tokens, base.decoder.embed_tokens, sim.lm_head]
    for r in range(2):
        assert len({id(t.ranks[r].weight) for t in tables}) == 1
        assert tables[0].ranks[r].weight.shape[0] == 256 // 2  # 97 padded to 128 x tp
    ids = _batch(pad=False)["input_ids"]
    with torch.no_grad():
        got, want = sim(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert (got.logits - want.logits).abs().max() < 1e-10
    full = autotp.full_state_dict(sim)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    for beams in (1, 2):
        kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "num_beams": beams}
        assert torch.equal(sim.generate(ids, **kw), model.generate(ids, **kw))


def _encoder_decoder_on_rank(rank: int, world: int) -> tuple:
    model = _encoder_decoder("bart")
    module = autotp.parallelize(model, world)
    ids = _batch(pad=False)["input_ids"]
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    out = module.generate(ids, return_dict_in_generate=True, **kw)
    keys = out.past_key_values.self_attention_cache.layers[0].keys
    return out.sequences.tolist(), model.generate(ids, **kw).tolist(), tuple(keys.shape)


@pytest.mark.slow
def test_an_encoder_decoder_generates_on_gloo_ranks() -> None:
    for got, want, keys in run_on_gloo(_encoder_decoder_on_rank, 2):
        assert got == want and len(set(got[0])) > 1  # the serial tokens, not one repeated
        assert keys[1] == 2  # this rank's 2 of the 4 heads


def test_tensors_a_layer_creates_follow_it_to_its_device() -> None:
    """A layer is traced on the CPU (unfilled tensors: no memory), so its graph creates
    T5's relative-position buckets with device=cpu; built for another device, every such
    op creates there instead (checked on the graph: no GPU here)."""
    from autotp.build.materialise import _created_on
    from autotp.regions.state import TRACED_ON

    plan = autotp.plan(_encoder_decoder("t5"), 2)
    graph = plan.regions[0].plan.graph

    def devices(g: torch.fx.Graph) -> set[torch.device]:
        return {a for n in g.nodes for a in (*n.args, *n.kwargs.values())
                if isinstance(a, torch.device)}  # fmt: skip

    assert TRACED_ON in devices(graph)
    assert devices(_created_on(graph, torch.device("cuda", 0), TRACED_ON)) == {
        torch.device("cuda", 0)
    }
    assert _created_on(graph, TRACED_ON, TRACED_ON) is graph  # where it runs: unchanged
