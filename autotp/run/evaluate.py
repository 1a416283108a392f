"""Evaluation metrics on any `logits_fn(ids [B, T]) -> logits [B, T, V]`: a serial model, a
parallel one, or a wrapper that gathers vocab-parallel logits.

    ppl, n = sliding_window_perplexity(model, tokens, context=1024, stride=512)  # WikiText
    acc = last_word_accuracy(model, *lambada_file("lambada_test.jsonl", encode))  # LAMBADA

Both run under torch.no_grad() and send ids on the device of the tokens they are given.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["sliding_windows", "sliding_window_perplexity", "last_word_accuracy", "lambada_file"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows (begin, end, first) of the sliding evaluation over n_tokens tokens: the
    model reads ids [begin, end) and the targets first..end (ids shifted by one) are scored.

    Every target 1..n_tokens-1 is scored exactly once. Each window after the first scores
    the next `stride` targets; every window is min(context, n_tokens - 1) ids long and ends
    right before its last target, so each target is predicted from at least
    context - stride + 1 ids (from all earlier ones near the start):

        tokens  0 1 2 3 4 5 6 7 8        context 4, stride 2
        window  [0 1 2 3] 4              scores 1 2 3 4
        window      [2 3 4 5] 6          scores 5 6
        window          [4 5 6 7] 8      scores 7 8
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    last = n_tokens - 1  # the last target
    end = min(context, last)
    out = [(0, end, 1)]
    while end < last:
        first, end = end + 1, min(end + stride, last)
        out.append((end - context, end, first))
    return out


@torch.no_grad()
def sliding_window_perplexity(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    context: int,
    stride: int | None = None,
    *,
    batch_size: int = 1,
) -> tuple[float, int]:
    """(perplexity, targets scored) of a 1-D token sequence, by overlapping windows of
    `context` ids moved by `stride` (default context // 2), each target scored once with the
    most context available: the evaluation the Megatron-LM paper used on WikiText-103 (see
    `sliding_windows`). `batch_size` windows go through logits_fn at a time.

    For a word-level perplexity, as the paper reports, rescale the mean loss yourself:
    exp(log(ppl) * n / (word_count - 1))."""
    tokens = tokens.reshape(-1).long()
    stride = context // 2 if stride is None else stride
    windows = sliding_windows(len(tokens), context, stride)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        ids = torch.stack([tokens[b:e] for b, e, _ in group])  # (B, L): all windows same L
        targets = torch.stack([tokens[b + 1 : e + 1] for b, e, _ in group])
        logits = logits_fn(ids)  # (B, L, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        for row, (b, _e, first) in enumerate(group):
            scored = nll[row, first - b - 1 :]  # targets first..e sit at positions first-b-1..
            total += scored.double().sum().item()
            count += scored.numel()
    return math.exp(total / count), count


@torch.no_grad()
def last_word_accuracy(
    logits_fn: LogitsFn,
    passages: list[list[int]],
    targets: list[list[int]],
    *,
    context: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """LAMBADA accuracy: the fraction of passages whose target word (one or more tokens) the
    model predicts exactly by greedy argmax, each token given the passage and the target
    tokens before it. `context` keeps only that many trailing ids (the model's maximum)."""
    if len(passages) != len(targets) or not passages:
        raise ValueError(
            f"need the same positive number of passages and targets, got {len(passages)} "
            f"passages and {len(targets)} targets"
        )
    correct = 0
    for i, (passage, target) in enumerate(zip(passages, targets, strict=True)):
        if not passage or not target:
            raise ValueError(f"passage {i} has an empty context or target word")
        if context is not None and context < len(target):
            raise ValueError(f"context={context} is shorter than target {i} ({len(target)} ids)")
        ids = (passage + target)[:-1]
        if context is not None:
            ids = ids[-context:]
        logits = logits_fn(torch.tensor([ids], device=device))  # (1, T, V)
        predicted = logits[0, -len(target) :].argmax(dim=-1)
        correct += predicted.tolist() == target
    return correct / len(passages)


def lambada_file(
    path: str | Path, encode: Callable[[str], list[int]] = lambda s: list(s.encode())
) -> tuple[list[list[int]], list[list[int]]]:
    """(passages, targets) from a LAMBADA file: one passage per line (or, for .jsonl, per
    {"text": ...} record); the last whitespace-separated word is the target and the context
    keeps the space before it. Byte-level tokens unless `encode` says otherwise."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        lines = [json.loads(line)["text"] for line in lines if line.strip()]
    passages, targets = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"(.*\s)(\S+)\s*", line, flags=re.DOTALL)
        if m is None or not m.group(1).strip():
            raise ValueError(f"{path}:{number}: a passage needs a context and a last word")
        passages.append(encode(m.group(1)))
        targets.append(encode(m.group(2)))
    return passages, targets
