"""Pretrained weights read shard by shard from safetensors (`weights=`): a model built on
the meta device computes what the saved one does, and each rank reads only its slices."""

from __future__ import annotations

import pytest
import torch
from hf_models import llama

import autotp
from autotp.build.weights import Weights
from autotp.testing import assert_equivalent, run_on_gloo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _llama(meta: bool = False) -> torch.nn.Module:
    return llama(vocab=97, meta=meta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A float64 Llama saved by save_pretrained in several shard files (with an index)."""
    folder = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return str(folder)


@pytest.mark.parametrize("tp", [2, 4])
def test_meta_model_from_sharded_safetensors_equals_serial(saved, tp) -> None:
    """Outputs, loss, every gradient and one optimiser step (rotary frequencies, which
    save_pretrained does not store, remade by the model's own initialiser); at tp=4 each
    of the 2 key/value heads is read by the 2 ranks holding it."""
    x = {"input_ids": torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))}
    x["labels"] = x["input_ids"]
    assert_equivalent(_llama(), x, tp, atol=1e-10, rtol=1e-6,
                      parallel=lambda m, tp, _: autotp.simulate(_llama(meta=True), tp,
                                                                weights=saved))  # fmt: skip


def _load_on_rank(rank: int, world: int, folder: str) -> tuple:
    read: list[int] = []
    original = Weights.read

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        read.append(out.numel())
        return out

    Weights.read = counting  # type: ignore[method-assign]
    module = autotp.parallelize(_llama(meta=True), world, weights=folder)
    Weights.read = original  # type: ignore[method-assign]
    held = sum(t.numel() for t in {id(t): t for t in module.state_dict().values()}.values())
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    got = module.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = _llama().generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return sum(read), held, torch.equal(got, want)


def test_each_rank_reads_only_its_slices(saved) -> None:
    """On gloo ranks: every element a rank reads is one it keeps (no whole tensor is read to
    be cut), and greedy generation equals the serial model's."""
    full = sum(t.numel() for t in _llama().state_dict().values() if t is not None) - 97 * 32
    for read, held, same in run_on_gloo(_load_on_rank, 2, saved):
        assert read == held < full
        assert same


def test_graph_form_from_a_safetensors_file(tmp_path) -> None:
    """The whole-graph form on the meta device (the runner's own GPT-2), one file."""
    from safetensors.torch import save_file

    from autotp.models import build

    torch.manual_seed(0)
    model = build("gpt2-tiny").double()
    state = {}
    for k, v in model.state_dict().items():  # tied tensors once, as save_pretrained does
        if all(v.data_ptr() != w.data_ptr() for w in state.values()):
            state[k] = v.contiguous()
    save_file(state, tmp_path / "w.safetensors")
    with torch.device("meta"):
        skeleton = build("gpt2-tiny").double()
    x = model.example_inputs()
    sim = autotp.simulate(skeleton, 2, {k: v.to("meta") for k, v in x.items()},
                          weights=tmp_path / "w.safetensors")  # fmt: skip
    assert (sim(**x)[0] - model(**x)[0]).abs().max() < 1e-12


def test_missing_tensor_is_named(tmp_path) -> None:
    from safetensors.torch import save_file

    state = {k: v for k, v in _llama().state_dict().items() if "layers.1.mlp" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    with pytest.raises(autotp.AutoTPError, match=r"(?s)model\.layers\.1\.mlp\..*weights="):
        autotp.simulate(_llama(meta=True), 2, weights=tmp_path / "w.safetensors")


FACTORY = """
import transformers


def small():
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=260, max_position_embeddings=64, use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)
"""


def _runner_start(rank: int, world: int, cfg) -> dict:
    from autotp.run.train import Trainer

    trainer = Trainer(cfg)
    loss = trainer.train_step()
    return {
        "start_loss": loss,
        "params": {n: p.shape for n, p in trainer.module.named_parameters()},
    }


def test_runner_init_from_reads_saved_weights(tmp_path) -> None:
    """autotp train --init-from FOLDER: a factory's Llama, saved by save_pretrained, is the
    start of a tp=2 run whose first loss is the saved model's on that batch."""
    from autotp.run import data as data_mod
    from autotp.run.config import TrainConfig
    from autotp.run.resolve import build

    (tmp_path / "f.py").write_text(FACTORY)
    spec = f"{tmp_path / 'f.py'}:small"
    torch.manual_seed(5)
    model = build(spec)
    model.save_pretrained(tmp_path / "saved")
    cfg = TrainConfig(model=spec, tp=2, steps=1, batch=4, seq=16, warmup=1, progress=False,
                      eval_batches=0, init_from=str(tmp_path / "saved"))  # fmt: skip
    rows = run_on_gloo(_runner_start, 2, cfg)
    train, _ = data_mod.load(None).split(0.05)
    x, _ = data_mod.batch(train, 0, cfg.batch, cfg.seq, seed=cfg.seed)
    with torch.no_grad():
        want = model(input_ids=x, labels=x).loss.item()
    for row in rows:
        assert abs(row["start_loss"] - want) < 1e-5
        assert tuple(row["params"]["model.layers.0.self_attn.q_proj.weight"]) == (16, 32)


def _bert_config():
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, vocab_size=97, num_labels=3,
    )  # fmt: skip


@pytest.mark.parametrize("saved_as", ["BertForMaskedLM", "BertModel"])
def test_a_task_head_over_a_base_checkpoint_starts_as_from_pretrained(saved_as, tmp_path) -> None:
    """The first step of every fine-tune: a classifier over a masked-LM's (or a bare
    encoder's, saved without the "bert." prefix) checkpoint. The checkpoint's tensors are
    read under either name; the pooler and classifier it lacks are initialised by the
    model's own _init_weights (std 0.02, zero bias), as from_pretrained does; the
    parallel model equals a serial one holding the same weights."""
    cfg = _bert_config()
    torch.manual_seed(0)
    getattr(transformers, saved_as)(cfg).double().save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.BertForSequenceClassification(cfg).double().eval()
    sim = autotp.simulate(model, 2, weights=tmp_path)
    full = autotp.full_state_dict(sim)
    reference = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, dtype=torch.float64
    )
    for name, t in reference.state_dict().items():
        if not name.startswith(("classifier.", "bert.pooler.")):
            assert torch.equal(full[name], t), name
    assert 0.01 < float(full["classifier.weight"].std()) < 0.03
    assert float(full["classifier.bias"].abs().max()) == 0.0
    serial = transformers.BertForSequenceClassification(cfg).double().eval()
    serial.load_state_dict(full)
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (sim(input_ids=ids).logits - serial(input_ids=ids).logits).abs().max() < 1e-12


def test_a_checkpoint_stored_under_transformers_conversion_is_read_as_from_pretrained(
    tmp_path,
) -> None:
    """Mixtral's save_pretrained writes one tensor per expert under `block_sparse_moe`
    where the model holds one fused tensor under `mlp`: read through transformers' own
    conversion mapping (renamed, stacked, concatenated), each rank cutting its slice."""
    cfg = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, experts_implementation="batched_mm",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).double().eval()
    model.save_pretrained(tmp_path)
    assert not any("experts.gate_up_proj" in k for k in Weights(tmp_path)._where)
    with torch.device("meta"):
        meta = transformers.MixtralForCausalLM(cfg).double().eval()
    sim = autotp.simulate(meta, 2, weights=tmp_path)
    full = autotp.full_state_dict(sim)
    for name, t in model.state_dict().items():
        assert torch.equal(full[name], t), name
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (sim(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-12
