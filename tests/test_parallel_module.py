"""A parallel transformers model is a module like any other: what a user does to it by
attribute path, through `parameters()` and `state_dict()`, with `functional_call`,
`deepcopy`, `save_pretrained`, dropout `p`, the attention implementation or gradient
checkpointing acts on what runs (equal to the serial model given the same), or is
refused by name. The user's model is not consulted after building."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import autotp
from autotp.testing import run_on_gloo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 97


def _llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  vocab_size=VOCAB)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double().eval()  # default dropout, 0.1


def _x() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def _logits(model: torch.nn.Module, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**_x(), **kw).logits


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return float((a - b).abs().max()) < tol


def test_a_simulated_layer_is_reached_per_rank_and_edits_act() -> None:
    """`sim.model.layers[0].mlp` is refused (each rank holds its own: an AttributeError,
    so hasattr stays a question); each rank's copy, edited, is what runs."""
    serial = _llama()
    sim = autotp.simulate(serial, 2)
    sim(**_x())
    layer = sim.model.layers[0]
    with pytest.raises(autotp.AutoTPError, match=r"model\.layers\.0\.ranks\[r\]\.mlp"):
        layer.mlp  # noqa: B018
    assert not hasattr(layer, "mlp")
    with torch.no_grad():
        for r in range(2):
            layer.ranks[r].mlp.gate_proj.weight.mul_(2.0)
        serial.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    assert _close(_logits(sim), _logits(serial))


def test_weights_assigned_loaded_or_swapped_reach_the_layers() -> None:
    """load_state_dict of a serial state_dict (assign or not) is cut into shards; the
    parallel model's own state_dict loads back; functional_call runs the given tensors;
    a tensor of a shard's wrong shape is refused by name."""
    serial, other = _llama(), _llama(seed=1)
    sim = autotp.simulate(serial, 2)
    sim(**_x())
    for assign in (False, True):
        sim.load_state_dict(other.state_dict(), assign=assign)
        assert _close(_logits(sim), _logits(other))
    sim.load_state_dict(sim.state_dict())
    assert _close(_logits(sim), _logits(other))
    scaled = {n: p * 1.01 for n, p in sim.named_parameters()}
    scaled_serial = {n: p * 1.01 for n, p in other.named_parameters()}
    with torch.no_grad():
        got = torch.func.functional_call(sim, scaled, (), _x()).logits
        want = torch.func.functional_call(other, scaled_serial, (), _x()).logits
    assert _close(got, want)
    assert _close(_logits(sim), _logits(other))  # and back to its own tensors
    full = other.model.layers[1].mlp.up_proj.weight
    sim.model.layers[1].ranks[0].mlp.up_proj.weight = torch.nn.Parameter(full.clone())
    with pytest.raises(autotp.AutoTPError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        sim(**_x())


def test_frozen_weights_stay_and_unfrozen_ones_count_in_the_norm() -> None:
    """requires_grad_(False) on a layer's weight freezes what runs; unfrozen again, its
    gradient counts in clip_grad_norm_'s norm as serial's does."""
    serial = _llama()
    sim = autotp.simulate(serial, 2)
    frozen = [p for n, p in sim.named_parameters() if "layers.0" in n and "q_proj" in n]
    for p in frozen:
        p.requires_grad_(False)
    serial.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    for m in (sim, serial):
        m(**_x()).loss.backward()
    assert all(p.grad is None for p in frozen)
    for p in [*frozen, serial.model.layers[0].self_attn.q_proj.weight]:
        p.requires_grad_(True)
    norms = []
    for m in (sim, serial):
        m.zero_grad()
        m(**_x()).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)))
    assert abs(norms[0] - norms[1]) < 1e-9 * norms[1]


def test_a_hook_inside_a_parallel_layer_is_refused_by_name() -> None:
    sim = autotp.simulate(_llama(), 2)
    sim.model.layers[1].ranks[0].mlp.register_forward_hook(lambda *a: None)
    with pytest.raises(autotp.AutoTPError, match=r"model\.layers\.1\.mlp \(rank 0's copy\)"):
        sim(**_x())


def test_dropout_p_set_after_parallelizing_acts() -> None:
    """Fine-tuning libraries set every Dropout's p after building: in train mode the
    parallel model then equals the serial model with p = 0, and 0.1 differs."""
    serial = _gpt2()
    sim = autotp.simulate(serial, 2)
    sim(**_x())
    for m in (*sim.modules(), *serial.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    sim.train()
    serial.train()
    assert _close(_logits(sim), _logits(serial))


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _uses_sdpa(model: torch.nn.Module) -> bool:
    with _Ops() as ops:
        _logits(model)
    return any("scaled_dot_product" in n for n in ops.names)


def test_attention_implementation_is_the_parallel_models_own() -> None:
    """set_attn_implementation on the parallel model reaches its layers; on the user's
    model after building, it does not."""
    serial = _llama()
    sim = autotp.simulate(serial, 2)
    assert _uses_sdpa(sim)
    serial.set_attn_implementation("eager")
    assert _uses_sdpa(sim) and not _uses_sdpa(serial)
    sim.set_attn_implementation("eager")
    assert not _uses_sdpa(sim)
    assert _close(_logits(sim), _logits(serial))


def _saved_in_forward(model: torch.nn.Module) -> tuple[int, torch.Tensor]:
    """How many tensors the forward keeps for backward, and the loss."""
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**_x()).loss
    return count[0], loss


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_keeps_fewer_activations_and_equals_serial(when: str) -> None:
    """Enabled on the user's model before building, or on the parallel model after it
    (before its first call): the layers keep no activations, gradients are serial's."""
    serial = _llama()
    plain = autotp.simulate(serial, 2).train()
    if when == "before":
        serial.activation_checkpointing_enable()
    sim = autotp.simulate(serial, 2)
    if when == "after":
        serial.activation_checkpointing_enable()
        sim.activation_checkpointing_enable()
    sim.train()
    serial.train()
    kept, loss = _saved_in_forward(sim)
    loss.backward()
    serial(**_x()).loss.backward()
    assert kept < _saved_in_forward(plain)[0] / 2
    full = autotp.full_grads(sim)
    worst = max(float((full[n] - p.grad).abs().max()) for n, p in serial.named_parameters())
    assert worst < 1e-10


def test_deepcopy_is_an_independent_parallel_model() -> None:
    """An EMA or reference copy: equal when made, untouched by training the original."""
    serial = _llama()
    sim = autotp.simulate(serial, 2)
    sim(**_x())
    ema = copy.deepcopy(sim)
    before = _logits(sim)
    assert _close(_logits(ema), before)
    opt = torch.optim.SGD(sim.parameters(), lr=0.1)
    sim(**_x()).loss.backward()
    opt.step()
    assert not _close(_logits(sim), before, 1e-4)
    assert _close(_logits(ema), before)


def test_save_pretrained_writes_the_serial_checkpoint(tmp_path) -> None:
    serial = _llama()
    sim = autotp.simulate(serial, 2)
    sim(**_x())
    sim.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).double().eval()
    assert _close(_logits(back), _logits(serial))


def _on_rank(rank: int, world: int, folder: str) -> dict:
    serial = _llama()
    module = autotp.parallelize(serial, world)
    out: dict = {"keys": list(module.state_dict()) == list(serial.state_dict())}
    gate = module.model.layers[0].mlp.gate_proj.weight
    out["shard"] = tuple(gate.shape)
    with torch.no_grad():  # by attribute path: this rank's shard of it
        gate.mul_(2.0)
        serial.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    out["edited"] = float((_logits(module) - _logits(serial)).abs().max())
    module.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    try:
        module(**_x())
        out["hook"] = "ran"
    except autotp.AutoTPError as e:
        out["hook"] = str(e).splitlines()[0]
    module.model.layers[0].mlp._forward_hooks.clear()
    other = _llama(seed=1)
    module.load_state_dict(other.state_dict(), assign=True)
    out["loaded"] = float((_logits(module) - _logits(other)).abs().max())
    module.save_pretrained(folder)
    torch.distributed.barrier()
    back = transformers.LlamaForCausalLM.from_pretrained(folder).double().eval()
    out["saved"] = float((_logits(back) - _logits(other)).abs().max())
    return out


def test_on_gloo_ranks_a_layer_path_is_the_ranks_own(tmp_path) -> None:
    """parallelize: the serial state_dict keys, each holding this rank's shard; edits by
    attribute path act; a hook inside a layer is refused; a serial state_dict loads with
    assign=True; save_pretrained writes a checkpoint from_pretrained reads as serial."""
    for r in run_on_gloo(_on_rank, 2, str(tmp_path)):
        assert r["keys"] and r["shard"] == (32, 32)
        assert r["edited"] < 1e-10 and r["loaded"] < 1e-10 and r["saved"] < 1e-10
        assert "model.layers.0.mlp has a forward hook" in r["hook"]


def _seeded_per_rank(rank: int, world: int, case: str) -> str | float:
    model = _gpt2().train()  # dropout outside the layers too (the embeddings')
    if case == "before":
        torch.manual_seed(100 + rank)  # data-parallel code's habit
    module = autotp.parallelize(model, world)
    x = _x()
    if case == "after":
        torch.manual_seed(100 + rank)
    if case == "batch":
        x = {k: v + rank for k, v in x.items()}  # a sampler over the tensor-parallel ranks
    try:
        return float(module(**x).loss.detach())
    except autotp.AutoTPError as e:
        return str(e).splitlines()[0]


@pytest.mark.parametrize("case", ["before", "after", "batch"])
def test_ranks_agree_on_random_state_and_inputs_or_are_refused(case: str) -> None:
    """Seeded per rank before building: the ranks are given rank 0's random state, and
    compute one loss. Reseeded per rank after it, or fed different batches: the first
    call is refused, naming what differs."""
    got = run_on_gloo(_seeded_per_rank, 2, case)
    if case == "before":
        assert isinstance(got[0], float) and got[0] == got[1]
    else:
        what = "the random state" if case == "after" else "input_ids"
        assert all(isinstance(g, str) and f"disagree in {what}" in g for g in got)


def test_a_sentence_transformer_passed_whole(tmp_path) -> None:
    """A SentenceTransformer (a transformers encoder inside sentence-transformers'
    modules): its encoder's layers are made parallel, encode() gives the serial
    embeddings, and save() writes a folder that loads back as the serial model."""
    st = pytest.importorskip("sentence_transformers")
    import sentence_transformers.models as st_models

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=len(words))  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    modules = [st_models.Transformer(str(tmp_path / "bert")), st_models.Pooling(32)]
    serial = st.SentenceTransformer(modules=modules, device="cpu").double().eval()
    sentences = ["w1 w2 w3 w4", "w5 w6"]
    want = serial.encode(sentences, convert_to_tensor=True)
    sim = autotp.simulate(serial, 2)
    assert _close(sim.encode(sentences, convert_to_tensor=True), want)
    sim.save(str(tmp_path / "saved"))
    back = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu").double()
    assert _close(back.encode(sentences, convert_to_tensor=True), want)


def _dcp_on_rank(rank: int, world: int, folder: str) -> dict:
    import torch.distributed.checkpoint as dcp

    trained = _llama(seed=1)
    module = autotp.parallelize(trained, world)
    state = module.state_dict()
    dcp.save(state, checkpoint_id=folder)  # each rank its chunks of the serial tensors
    fresh = autotp.parallelize(_llama(seed=2), world)
    into = fresh.state_dict()
    dcp.load(into, checkpoint_id=folder)
    fresh.load_state_dict(into)
    serial = _llama(seed=3)  # a serial model reads the same folder
    whole = serial.state_dict()
    dcp.load(whole, checkpoint_id=folder)
    serial.load_state_dict(whole)
    return {
        "reloaded": float((_logits(fresh) - _logits(trained)).abs().max()),
        "serial": max(float((whole[k] - v).abs().max()) for k, v in trained.state_dict().items()),
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_dcp_of_a_parallel_models_state_dict_is_the_serial_checkpoint(tmp_path, tp) -> None:
    """torch.distributed.checkpoint on module.state_dict(): each rank writes its chunks
    of the serial tensors (plain tensors of one name would be taken as replicated: rank
    0's shard written alone, and loaded on every rank). A parallel model and a serial
    one both load it back; at tp=4 two ranks hold each key/value head, the same chunk."""
    for r in run_on_gloo(_dcp_on_rank, tp, str(tmp_path)):
        assert r["reloaded"] < 1e-10 and r["serial"] == 0.0


def _dcp_graph_on_rank(rank: int, world: int, folder: str) -> dict:
    import torch.distributed.checkpoint as dcp

    from autotp.models import build

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build("gpt2-tiny", n_layer=2, dropout=0.0).double()

    trained = model(1)
    x = trained.example_inputs()
    module = autotp.parallelize(trained, world, x)
    dcp.save(module.state_dict(), checkpoint_id=folder)
    fresh = autotp.parallelize(model(2), world, x)
    into = fresh.state_dict()
    dcp.load(into, checkpoint_id=folder)
    fresh.load_state_dict(into)
    serial = model(3)
    whole = serial.state_dict()
    dcp.load(whole, checkpoint_id=folder)
    path = f"{folder}/rank{rank}.pt"
    torch.save(module.state_dict(), path)  # a plain tensor per name, as before
    again = torch.load(path, weights_only=True)
    return {
        "reloaded": float((fresh(**x)[0] - trained(**x)[0]).detach().abs().max()),
        "serial": max(float((whole[k] - v).abs().max()) for k, v in trained.state_dict().items()),
        "saved": all(type(v) is torch.Tensor for v in again.values()),
    }


def test_dcp_of_a_whole_graph_parallel_module(tmp_path) -> None:
    for r in run_on_gloo(_dcp_graph_on_rank, 2, str(tmp_path)):
        assert r["reloaded"] < 1e-10 and r["serial"] == 0.0 and r["saved"]
