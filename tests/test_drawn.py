"""A transformers model trained by `autotp train` is built without its large tensors and
each rank draws its own shards of them: the values are exactly the serial build's from the
same seed, and the generator ends where the serial build leaves it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import FACTORIES

from autotp.common.errors import AutoTPError
from autotp.run.drawn import LARGE, Drawn
from autotp.run.train import TrainConfig, Trainer
from autotp.testing import run_on_gloo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2() -> torch.nn.Module:
    # tied wte/lm_head, Conv1D weights drawn at construction and again by _init_weights,
    # and a padding row zeroed through a view
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=2048, n_positions=64, use_cache=False,
        pad_token_id=3))  # fmt: skip


def _bert() -> torch.nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=2048, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=1024, pad_token_id=0))  # fmt: skip


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_drawn_tensors_are_the_serial_builds(make) -> None:
    drawn = Drawn.build(make, seed=5)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    serial = make()
    assert torch.equal(after, torch.get_rng_state())  # what is drawn next is serial's too
    large = [n for n, t in serial.state_dict().items() if t.numel() >= LARGE]
    assert large and set(large) <= {n for n in large if n in drawn}
    assert all(drawn.model.get_parameter(n).is_meta for n in large if "weight" in n)
    kept = drawn.model.state_dict()
    for name, want in serial.state_dict().items():
        got = drawn.whole(name) if name in drawn else kept[name]
        assert torch.equal(got, want), name


class _ReadsItsWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(LARGE, 1)
        self.scale = torch.nn.Parameter(self.table.weight.mean().reshape(1))  # reads it


def test_a_model_that_reads_a_large_tensor_while_built_is_refused() -> None:
    """Its small tensor's value would come from a value the record does not keep: the
    runner then builds it whole (draw returns None)."""
    with pytest.raises(AutoTPError, match="cannot draw"):
        Drawn.build(_ReadsItsWeight, seed=0)


def _start(rank: int, world: int, cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    meta = sorted(n for n, p in trainer.model.named_parameters() if p.is_meta)
    kinds = {type(m).__name__ for m in trainer.module.modules()}
    return {"start": trainer.serial_state(), "meta": meta, "loss": trainer.train_step(),
            "regions": "ParallelLlamaDecoderLayer" in kinds}  # fmt: skip


@pytest.mark.parametrize("sp", [False, True], ids=["regions", "regions-sp"])
def test_a_rank_draws_its_shards_of_the_serial_initial_weights(tmp_path: Path, sp: bool) -> None:
    """`--model file.py:llama_to_draw` at tp=2 (the region form, with and without --sp):
    the embedding, head and MLP weights are never held whole by a rank's model; gathered,
    the rank modules hold the serial build's weights bit for bit, and the first loss is the
    serial model's."""
    from autotp.run import data as data_mod

    path = tmp_path / "factory.py"
    path.write_text(FACTORIES)
    cfg = TrainConfig(model=f"{path}:llama_to_draw", tp=2, steps=1, batch=4, seq=32, accum=1,
                      warmup=1, progress=False, eval_batches=0, dtype="float64", sp=sp)  # fmt: skip
    got = run_on_gloo(_start, 2, cfg)[0]
    namespace: dict = {}
    exec(FACTORIES, namespace)
    torch.manual_seed(cfg.seed)
    serial = namespace["llama_to_draw"]().double()
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(got["meta"])
    assert got["regions"]
    want = serial.state_dict()
    assert set(got["start"]) == set(want)
    assert all(torch.equal(got["start"][n], want[n]) for n in want)
    train, _ = data_mod.load(None).split(0.05)
    x, _ = data_mod.batch(train, 0, cfg.batch, cfg.seq, seed=cfg.seed)
    with torch.no_grad():
        loss = serial(input_ids=x, labels=x).loss.item()
    assert abs(got["loss"] - loss) <= 1e-6  # Llama's loss is float32 inside the model


def _step_and_save(rank: int, world: int, cfg: TrainConfig) -> dict:
    from autotp.run.checkpoint import Checkpoints

    trainer = Trainer(cfg)
    trainer.train_step()
    Checkpoints(cfg.ckpt_dir).save(trainer)
    return trainer.serial_state()


def test_a_checkpoint_rebuilds_the_serial_model_holding_its_weights_once(tmp_path: Path) -> None:
    """`autotp eval` and `autotp generate` rebuild the run's serial model: drawn without its
    large tensors, which the checkpoint's replace; the trained weights, and what the
    model computes with them, are the run's."""
    from autotp.run.checkpoint import serial_model

    path = tmp_path / "factory.py"
    path.write_text(FACTORIES)
    cfg = TrainConfig(model=f"{path}:llama_to_draw", tp=2, steps=1, batch=4, seq=32, accum=1,
                      warmup=1, progress=False, eval_batches=0, dtype="float64",
                      ckpt_dir=str(tmp_path / "run"))  # fmt: skip
    trained = run_on_gloo(_step_and_save, 2, cfg)[0]
    model, _ = serial_model(tmp_path / "run")
    state = model.state_dict()
    assert set(state) == set(trained)
    assert all(torch.equal(state[n], trained[n]) for n in trained)
    namespace: dict = {}
    exec(FACTORIES, namespace)
    whole = namespace["llama_to_draw"]().double().eval()
    whole.load_state_dict(trained)
    ids = torch.randint(0, 4096, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
