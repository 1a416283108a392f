"""The vocabulary split: embedding and output layer (tied or untied), the vocab-parallel
cross-entropy, padding that never shows, and logits gathered or kept local."""

from __future__ import annotations

import pytest
import torch

import autotp
from autotp.models import build
from autotp.testing import assert_equivalent, run_on_gloo


def _gpt2(**over):
    torch.manual_seed(0)
    return build("gpt2-tiny", n_layer=1, **over)


def _bert(**over):
    torch.manual_seed(0)
    return build("bert-tiny", num_hidden_layers=1, **over)


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("vocab", [13, 101, 256])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_equals_serial_tied_untied_odd_vocab(family, tied, vocab, tp) -> None:
    if family == "gpt2":
        model = _gpt2(tie_word_embeddings=tied, vocab_size=vocab, n_head=12, n_embd=24)
    else:
        model = _bert(tie_word_embeddings=tied, vocab_size=vocab, num_attention_heads=12,
                      hidden_size=24, intermediate_size=48)  # fmt: skip
    assert assert_equivalent(model, None, tp).largest() <= 1e-10


def test_loss_outside_the_graph_gathers_logits() -> None:
    """Without targets the model returns logits only: they come back whole."""
    model = _gpt2()
    x = {"idx": model.example_inputs()["idx"]}
    plan = autotp.plan(model, 2, x)
    assert plan.collectives()["gather"] == 1 and plan.collectives()["max"] == 0
    assert assert_equivalent(model, x, 2).largest() <= 1e-10


def test_ignore_index_and_reductions() -> None:
    model = _gpt2().double()
    x = model.example_inputs(batch=3, seq=6)
    x["targets"][0, :4] = -1  # GPT-2's ignore_index
    assert assert_equivalent(model, x, 4).largest() <= 1e-10
    model = _bert().double()  # BERT: -100 labels, and a padded attention mask
    assert assert_equivalent(model, model.example_inputs(batch=3, seq=6), 4).largest() <= 1e-10


def test_tied_weights_stay_tied_and_padding_is_inert() -> None:
    model = _gpt2(vocab_size=101).double()
    x = model.example_inputs()
    sim = autotp.simulate(model, 2, x)
    last = sim.ranks[1]
    assert last.get_parameter("lm_head.weight") is last.get_parameter("transformer.wte.weight")
    w = last.get_parameter("lm_head.weight")
    assert w.shape == (128, 32)  # 101 padded to 256 = 2 x 128: rank 1 holds rows 128..255
    assert torch.count_nonzero(w) == 0  # every row of rank 1 is padding
    _, loss = sim(**x)
    loss.backward()
    assert torch.count_nonzero(w.grad) == 0
    full = autotp.full_state_dict(sim)
    assert full["lm_head.weight"].shape == (101, 32)
    assert full["transformer.wte.weight"].shape == (101, 32)


def test_keep_local_logits() -> None:
    model = _gpt2(vocab_size=101).double()
    x = {"idx": model.example_inputs()["idx"]}
    opts = autotp.VocabOptions(gather_outputs=False)
    plan = autotp.plan(model, 2, x, vocab=opts)
    assert plan.collectives()["gather"] == 0
    sim = autotp.simulate(model, 2, x, vocab=opts)  # shown whole: slices concatenated
    assert (sim(**x)[0] - model(**x)[0]).abs().max() <= 1e-12
    mod = autotp.parallelize(model, 1, x, vocab=opts)
    assert mod(**x)[0].shape == (2, 8, 101)  # tp=1: nothing split, nothing padded


def test_vocab_padding_multiple() -> None:
    opts = autotp.VocabOptions(multiple=128)
    assert opts.padded(50257, 8) == 51200  # GPT-2, as in the paper
    assert opts.padded(50257, 1) == 50257
    assert autotp.VocabOptions(multiple=1).padded(13, 4) == 16


def test_loss_communicates_batch_times_seq_numbers() -> None:
    model = _gpt2(vocab_size=101).double()
    x = model.example_inputs(batch=3, seq=5)
    sim = autotp.simulate(model, 4, x, vocab=autotp.VocabOptions(gather_outputs=False))
    with autotp.count_collectives() as log:
        sim(**x)[1].backward()
    sizes = sorted(n for k, d, n in log.events if n < 3 * 5 * 32)
    assert sizes == [15, 15, 15]  # max, target logit, sum of exponentials


def _vocab_on_rank(rank: int, world: int, tied: bool) -> float:
    model = _gpt2(vocab_size=101, tie_word_embeddings=tied)
    report = assert_equivalent(
        model, None, world, parallel=lambda m, tp, x: autotp.parallelize(m, tp, x)
    )
    return report.largest()


@pytest.mark.parametrize("tied", [True, False])
def test_on_gloo(tied: bool) -> None:
    assert max(run_on_gloo(_vocab_on_rank, 2, tied)) <= 1e-10


@pytest.mark.parametrize("vocab", [20, None])  # padding columns on the last rank, or none
def test_ce_terms_backward_is_the_derivative(vocab) -> None:
    """The fused backward of the per-row terms equals the finite-difference derivative,
    for the logits and for the row max."""
    from autotp.runtime.vocab import vocab_ce_terms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    row_max = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.tensor([16, 17, 18, 0, 19])  # in this rank's slice [16, 24) or not
    rank = torch.tensor(2)

    def terms(lg, m):
        return vocab_ce_terms(lg, m, target, rank, vocab)

    assert torch.autograd.gradcheck(terms, (logits, row_max))
    t, s = terms(logits, row_max)
    real = 8 if vocab is None else vocab - 16
    z = logits.detach()[:, :real] - row_max.detach()[:, None]
    assert torch.allclose(s, z.exp().sum(-1), rtol=1e-14)
    inside = (target >= 16) & (target < 16 + real)
    expect = torch.where(inside, z.gather(1, (target - 16).clamp(0, real - 1)[:, None])[:, 0], 0)
    assert torch.equal(t, expect)
