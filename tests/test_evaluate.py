"""Evaluation metrics: the sliding window scores every token once with the most context it
can, equals one window when the text fits, and LAMBADA accuracy needs every target token."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from autotp.run.evaluate import (
    lambada_file,
    last_word_accuracy,
    sliding_window_perplexity,
    sliding_windows,
)

V = 64


def bigram(ids: torch.Tensor) -> torch.Tensor:
    """A context-free model: the logits depend on the current token only."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    return table[ids]  # (B, T, V)


def positional(ids: torch.Tensor) -> torch.Tensor:
    """A context-dependent causal model for ids = consecutive integers: the right next token
    (id + 1) gets logit log(p + 1) at window position p, so its loss falls with context."""
    B, T = ids.shape
    logits = torch.zeros(B, T, V)
    p = torch.arange(T, dtype=torch.float32).expand(B, T)
    logits.scatter_(2, (ids + 1).unsqueeze(-1), torch.log(p + 1).unsqueeze(-1))
    return logits


def one_window(logits_fn, tokens: torch.Tensor) -> tuple[float, int]:
    """The reference when the whole text fits in one context."""
    logits = logits_fn(tokens[:-1].unsqueeze(0))[0]
    return math.exp(F.cross_entropy(logits, tokens[1:]).item()), len(tokens) - 1


def brute_force(logits_fn, tokens: torch.Tensor, context: int, stride: int) -> float:
    """One call per target, reading exactly the ids its window gives it."""
    nll = []
    for begin, _end, first in sliding_windows(len(tokens), context, stride):
        for t in range(first, _end + 1):
            logits = logits_fn(tokens[begin:t].unsqueeze(0))[0, -1]
            nll.append(F.cross_entropy(logits, tokens[t]).item())
    return math.exp(sum(nll) / len(nll))


@given(n=st.integers(2, 40), context=st.integers(1, 12), data=st.data())
def test_windows_score_every_target_once_with_enough_context(n, context, data) -> None:
    stride = data.draw(st.integers(1, context))
    windows = sliding_windows(n, context, stride)
    scored = [t for _b, e, first in windows for t in range(first, e + 1)]
    assert scored == list(range(1, n))  # each target once, in order
    for begin, end, first in windows:
        assert 0 <= begin < first <= end and end - begin == min(context, n - 1)
        # the worst-placed target still sees context - stride + 1 ids (or all before it)
        assert first - begin >= min(first, context - stride + 1)


@pytest.mark.parametrize("model", [bigram, positional])
@pytest.mark.parametrize("stride", [1, 3, 8, None])
def test_sliding_equals_one_window_when_the_text_fits(model, stride) -> None:
    tokens = torch.arange(20) if model is positional else torch.randint(0, V, (20,))
    ref = one_window(model, tokens)
    for context in (19, 25):
        ppl, n = sliding_window_perplexity(model, tokens, context, stride)
        assert n == ref[1] == 19 and ppl == pytest.approx(ref[0], rel=1e-6)


@given(n=st.integers(2, 40), context=st.integers(1, 12), data=st.data())
def test_context_free_model_every_token_counted_once(n, context, data) -> None:
    stride = data.draw(st.integers(1, context))
    tokens = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))
    ppl, count = sliding_window_perplexity(bigram, tokens, context, stride)
    ref_ppl, ref_count = one_window(bigram, tokens)
    assert count == ref_count and ppl == pytest.approx(ref_ppl, rel=1e-5)


@pytest.mark.parametrize(("context", "stride"), [(4, 2), (4, 4), (5, 1), (7, 3)])
def test_context_dependent_model_matches_brute_force(context, stride) -> None:
    tokens = torch.arange(30)
    ppl, n = sliding_window_perplexity(positional, tokens, context, stride)
    assert n == 29 and ppl == pytest.approx(brute_force(positional, tokens, context, stride))
    batched, _ = sliding_window_perplexity(positional, tokens, context, stride, batch_size=4)
    assert batched == pytest.approx(ppl, rel=1e-12)
    # less overlap means less context per target: perplexity can only rise
    if stride > 1:
        assert ppl > sliding_window_perplexity(positional, tokens, context, 1)[0]


def test_sliding_refusals() -> None:
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(bigram, torch.arange(10), 4, 5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_perplexity(bigram, torch.arange(1), 4)


def successor(ids: torch.Tensor) -> torch.Tensor:
    """Greedy prediction of every position: the current id + 1."""
    return F.one_hot((ids + 1) % V, V).float()


def test_last_word_accuracy_needs_every_target_token() -> None:
    passages = [[1, 2, 3], [1, 2, 3], [7], [10, 0], [4]]
    targets = [[4, 5], [4, 6], [9], [1], [5, 6, 7]]
    # right: 1st (4 then 5), 4th, 5th; wrong: 2nd (second token), 3rd (first token)
    assert last_word_accuracy(successor, passages, targets) == pytest.approx(3 / 5)
    # the previous target tokens are given, not the model's own guesses
    assert last_word_accuracy(successor, [[3]], [[9, 10]]) == 0.0
    assert last_word_accuracy(successor, [[8]], [[9, 10]]) == 1.0


def test_last_word_accuracy_context_keeps_the_tail() -> None:
    seen = []

    def spy(ids: torch.Tensor) -> torch.Tensor:
        seen.append(ids[0].tolist())
        return successor(ids)

    assert last_word_accuracy(spy, [[1, 2, 3, 4, 5]], [[6, 7]], context=3) == 1.0
    assert seen == [[4, 5, 6]]
    with pytest.raises(ValueError, match="same positive number"):
        last_word_accuracy(successor, [[1]], [])


def test_lambada_file_round_trip(tmp_path) -> None:
    lines = ["the cat sat on the mat", "hello  world ", "", "one two"]
    path = tmp_path / "lambada.txt"
    path.write_text("\n".join(lines) + "\n")
    passages, targets = lambada_file(path)
    assert [bytes(p).decode() for p in passages] == ["the cat sat on the ", "hello  ", "one "]
    assert [bytes(t).decode() for t in targets] == ["mat", "world", "two"]
    jsonl = tmp_path / "lambada.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in lines if s))
    assert lambada_file(jsonl) == (passages, targets)
    # a byte model that has memorised the passages gets them all right
    pairs = zip(passages, targets, strict=True)
    memo = {tuple(p + t[:i]): t[i] for p, t in pairs for i in range(len(t))}

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        row = ids[0].tolist()
        nxt = [memo.get(tuple(row[: i + 1]), 0) for i in range(len(row))]
        return F.one_hot(torch.tensor([nxt]), 256).float()

    assert last_word_accuracy(lookup, passages, targets) == 1.0
    path.write_text("lonely\n")
    with pytest.raises(ValueError, match=r"lambada\.txt:1"):
        lambada_file(path)
