"""Table entries for the split layers themselves: linears, embeddings, the loss over split
logits, and the model's outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import cast

import torch
import torch.fx as fx

from ..match.call import Call, canonical
from ..match.patterns import EmbeddingInfo, LinearInfo
from ..match.rule import Column, Row, Vocab
from .context import Ctx, check_replicated, ndim, slice_span, val
from .placement import LossInfo, Partial, Placement, R, Shard, is_split


def _linear(c: Ctx, call: Call) -> Placement:
    n = call.node
    li = c.linears[n]
    px = c.p(li.input)
    nd = ndim(n)
    split = c.splits.get(n)
    if split is None:  # an unmatched linear: replicated weights
        if is_split(px):
            raise c.refuse(
                n, f"linear {li.weight} is not split but its input {li.input.name} is ({px})",
                "no rule matched this layer; its input must be replicated (report the model)",
            )  # fmt: skip
        c.use_param_replicated(n, li.weight)
        if li.bias:
            c.use_param_replicated(n, li.bias)
        return R
    kind = split[0]
    out_axis, in_axis = li.weight_axes
    feature = nd + li.feature_dim  # of the output; of the input, below
    if isinstance(kind, Vocab):
        if px != R or li.feature_dim != -1:
            raise c.refuse(
                n, f"an output layer split by vocabulary needs a replicated input and the "
                f"vocabulary last; {li.input.name} is {px}", "report the model",
            )  # fmt: skip
        padded = _padding(c, li.out_features)
        _shard_weight(c, n, li, Shard(out_axis, 1, padded))
        if li.bias:
            c.shard_param(n, li.bias, Shard(0, 1, padded))
        c.needs_f(li.input, n)
        return Shard(nd - 1, 1, padded)
    if isinstance(kind, Column):
        if px != R:
            raise c.refuse(
                n, f"a column-split linear needs a replicated input; {li.input.name} is {px}",
                "this rule's split conflicts with the one producing the input",
            )  # fmt: skip
        g, held = kind.replicas, kind.part_replicas
        sections = (_sections(c, n, feature, li.out_features, kind.parts, held)
                    if g == 1 else ())  # fmt: skip
        if held and not sections:
            raise c.refuse(
                n, f"{li.weight}'s parts are to be held by {'|'.join(map(str, held))} ranks, "
                "but it is not read as parts of unequal widths",
                "report the model: this split is for a fused Q|K|V read by slices",
            )  # fmt: skip
        parts = 1 if sections else kind.parts
        if li.out_features % (parts * c.tp // g):  # (each of unequal parts: _sections)
            raise c.refuse(
                n,
                f"{li.weight} has {li.out_features} output features"
                + (f" in {kind.parts} parts" if kind.parts > 1 else "")
                + f", not divisible by tp={c.tp}"
                + (f" / {g} ranks per slice" if g > 1 else ""),
                "choose tp dividing the layer's width (and its number of heads)",
            )
        out = Shard(feature, parts, replicas=g, sections=sections, part_replicas=held)
        _shard_weight(c, n, li, replace(out, dim=out_axis))
        if li.bias:
            c.shard_param(n, li.bias, replace(out, dim=0))
        c.needs_f(li.input, n)
        return out
    assert isinstance(kind, Row)
    wanted = Shard(ndim(li.input) + li.feature_dim, 1)
    if px != wanted:
        raise c.refuse(
            n, f"a row-split linear needs its input split along the features ({wanted}); "
            f"{li.input.name} is {px}",
            "the value reaching this layer was reshaped in a way that mixes shards",
        )  # fmt: skip
    if li.in_features % c.tp:
        raise c.refuse(n, f"{li.in_features} input features, not divisible by tp={c.tp}",
                       "choose tp dividing the layer's width")  # fmt: skip
    _shard_weight(c, n, li, Shard(in_axis, 1))
    if li.bias:
        c.use_param_replicated(n, li.bias)
    return Partial((li.bias,) if li.bias else ())  # the bias is added once, after the sum


def _sections(
    c: Ctx, n: fx.Node, dim: int, size: int, parts: int, held: tuple[int, ...] = ()
) -> tuple[int, ...]:  # fmt: skip
    """The serial sizes of a fused output's parts when everything reading it slices it
    along `dim` into `parts` contiguous parts (Phi-3's `qkv[..., :q]`, `[..., q:q + kv]`,
    `[..., q + kv:]`), each divisible by its number of slices (tp, or tp / the ranks
    holding each slice of it: `held`, per part); () when it is read otherwise (split,
    chunk, view: equal parts) or there is a single part."""
    if parts == 1:
        return ()
    spans = []
    for call in _readers(c, n):
        span = slice_span(c, call, dim, size)
        if span is None:
            return ()
        spans.append(span)
    spans = sorted(set(spans))
    tiled = [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == size
    sizes = tuple(b - a for a, b in spans)
    ways = [c.tp // g for g in held] if held else [c.tp] * len(sizes)
    if not tiled or len(sizes) != parts or any(x % w for x, w in zip(sizes, ways, strict=True)):
        if tiled and len(sizes) == parts:
            raise c.refuse(
                n, f"a fused projection read as parts {sizes}, not all divisible by "
                f"tp={c.tp}", "choose tp dividing every part (the heads of each)",
            )  # fmt: skip
        return ()
    return sizes


def _readers(c: Ctx, n: fx.Node) -> list[Call]:
    """The calls reading `n`, looking through slices that keep all of it (export spells
    `x[:, :, a:]` as three slices, two of them whole)."""
    out = []
    for user in n.users:
        call = canonical(user, c.gm)
        whole = call.op in ("slice", "getitem") and isinstance(val(user), torch.Tensor)
        if whole and tuple(val(user).shape) == tuple(val(n).shape):
            out.extend(_readers(c, user))
        else:
            out.append(call)
    return out


def _shard_weight(c: Ctx, n: fx.Node, li: LinearInfo, spec: Shard) -> None:
    c.shard_param(n, li.weight, spec)
    if li.weight_view is not None:  # `x @ W.T`, W[ids]: the view is part of the linear
        c.split_uses.add((li.weight, li.weight_view))


def _padding(c: Ctx, vocab: int) -> int | None:
    padded = c.options.padded(vocab, c.tp)
    return None if padded == vocab else padded


def _embedding(c: Ctx, call: Call) -> Placement:
    n = call.node
    split = c.splits.get(n)
    # an embedding's split holds its EmbeddingInfo (a linear's, its LinearInfo)
    info = cast("EmbeddingInfo | None", split[1] if split else None)
    if is_split(c.p(call.input)):
        raise c.refuse(n, "embedding lookup with split ids", "look up replicated ids")
    if info is None:
        weight = call["weight"]
        if isinstance(weight, fx.Node) and is_split(c.p(weight)):
            raise c.refuse(n, "lookup in a split table", "report the model")
        return R
    # padding_idx only stops that row's gradient; vocab_embedding keeps that (rewrite.py)
    extras = {k: call[k] for k in ("max_norm", "scale_grad_by_freq", "sparse") if call[k]}
    if extras:
        raise c.refuse(
            n, f"a vocabulary-split embedding with {extras}",
            "max_norm, scale_grad_by_freq and sparse are not supported on a split "
            "embedding; drop them or keep the embedding replicated",
        )  # fmt: skip
    c.shard_param(n, info.weight, Shard(0, 1, _padding(c, info.num_embeddings)))
    return Partial()  # rows of this rank's slice, zeros for other ids


def _cross_entropy(c: Ctx, call: Call) -> Placement:
    n, logits, target = call.node, call.input, call["target"]
    px = c.p(logits)
    if not isinstance(px, Shard):
        return check_replicated(c, call, "input")
    if c.tp == 1:  # one rank holds the whole vocabulary: keep the serial loss, bit for bit
        return R
    opts = {k: call[k] for k in ("weight", "ignore_index", "reduction", "label_smoothing")}
    opts.update({k: call[k] for k in ("size_average", "reduce") if call[k] is not None})
    nd = ndim(logits)
    ok = (
        nd == 2 and px.dim == 1 and px.parts == 1 and ndim(target) == 1
        and opts["weight"] is None and not opts["label_smoothing"]
        and opts["reduction"] in ("mean", "sum", "none") and c.p(target) == R
        and "size_average" not in opts and "reduce" not in opts  # legacy: use reduction=
    )  # fmt: skip
    if not ok:
        raise c.refuse(
            n, f"cross-entropy over logits split as {px} with {opts}",
            "the vocab-parallel cross-entropy takes [N, vocab] logits and [N] targets, "
            "mean/sum/none reduction, ignore_index, no class weights or label smoothing",
        )  # fmt: skip
    vocab = val(logits).shape[1]
    padded = px.padded if px.padded is not None else vocab
    c.losses[n] = LossInfo(
        vocab, padded, opts["ignore_index"], opts["reduction"], call.path("input"),
        call.path("target"),
    )  # fmt: skip
    return R


def _output(c: Ctx, call: Call) -> Placement:
    n = call.node
    leaves = call.leaves()
    local = {leaves[i] for i in c.options.local_outputs if -len(leaves) <= i < len(leaves)}
    for i, a in enumerate(leaves):
        if not isinstance(a, fx.Node) or not is_split(c.p(a)):
            continue
        pa = c.p(a)
        if c.reads_sequence(a, n) and i in c.options.hand_over:  # to the next layer
            c.handed.append(i - len(leaves))
            # the length of each call's sequence, no padding (a value split along the
            # sequence: a Shard, as Propagation.gathers holds)
            c.gathers[a] = (cast(Shard, pa), None)
            continue
        if c.reads_sequence(a, n):  # read whole (the sequence gathered), not as an output
            raise c.refuse(n, f"the model returns {a.name}, split along the sequence",
                           "read it whole")  # fmt: skip
        if not isinstance(pa, Shard) or pa.parts != 1:
            raise c.refuse(
                n, f"the model returns {a.name}, split as {pa}",
                "only values split along one dimension can be gathered for the output",
            )  # fmt: skip
        if pa.replicas > 1 and a not in local:
            raise c.refuse(
                n, f"the model returns {a.name}, whose slices several ranks hold ({pa})",
                "return values split by query heads, or keep the key/value projections whole",
            )  # fmt: skip
        c.gathers[a] = (pa, val(a).shape[pa.dim])
    return R


RULES: dict[str, Callable[[Ctx, Call], Placement]] = {
    "linear": _linear,  # column: R -> S(-1); row: S(-1) -> P (+ bias); vocab: R -> S(-1, pad)
    "addmm": _linear,  # Conv1D spelling of a linear
    "embedding": _embedding,  # vocab-split table: P (partial rows); others replicated
    "cross_entropy": _cross_entropy,  # over vocab-split logits: the vocab-parallel loss
    "output": _output,  # everything returned must be replicated
}
