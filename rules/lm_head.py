"""The output layer split along the vocabulary (logits per vocabulary slice).

    h -> [lm_head] -> logits -> cross_entropy(logits, targets)      serial
    f(h) -> [lm_head_r] -> logits_r -> vocab-parallel cross-entropy   rank r

Rank r computes logits for its slice of the (padded) vocabulary. When the loss is in the
graph, propagation replaces it by the vocab-parallel cross-entropy: all-reduces of the
row max, the target logit and the sum of exponentials, batch x seq numbers each; the logits
are never gathered. Logits the model returns are gathered (or kept local on request).
The weight may be tied to the input embedding: the same shard serves both.
An output layer is recognised by what it feeds (a cross-entropy, or the model's output)
and by its vocabulary: a cross-entropy's classes, or a weight tied to or as wide as a
table the model's inputs index, or declared by the model as its output embedding
(BERT's pooler, hidden -> hidden, is no output layer), and nothing but the logits
reaches the region between it and the loss or the output (a projection added to the
residual stream is no output layer, however wide).
Motivated by GPT-2's `lm_head` and BERT's `cls.predictions.decoder`.
"""

from typing import cast

from autotp.match import Context, LinearInfo, Match, Rule, activations, pattern, vocab


def _over_a_vocabulary(m: Match, ctx: Context) -> bool:
    """Feeds a cross-entropy, or is as wide as a table the model's inputs index (a token
    table, not the position table, whose ids come from arange)."""
    head = cast(LinearInfo, m.layers["head"])  # its pattern node is a "linear"
    inputs = activations(ctx.gm)
    tables = [e for e in ctx.embeddings.values() if e.input in inputs]
    tied = {id(ctx.gm.get_parameter(e.weight)) for e in tables}
    return (
        head.weight in ctx.tables  # the model declares it its output embedding
        or "loss" in m.nodes
        or id(ctx.gm.get_parameter(head.weight)) in tied
        or head.out_features in {e.num_embeddings for e in tables}
    )


RULE = Rule(
    name="lm_head",
    patterns=(
        pattern({"head": "linear", "loss": "cross_entropy"}, [("head", "loss", 0)]),
        pattern(  # logits reshaped, cast or scaled on their own: glue of one input
            {"head": "linear", "logits": ("glue", 1), "loss": "cross_entropy"},
            [("head", "logits", None), ("logits", "loss", 0)],
        ),
        pattern({"head": "linear", "out": "output"}, [("head", "out", None)]),
        pattern(  # not a residual sum: an inner projection as wide as the vocabulary
            {"head": "linear", "logits": ("glue", 1), "out": "output"},
            [("head", "logits", None), ("logits", "out", None)],
        ),
    ),
    split={"head": vocab},
    motivation="GPT-2 lm_head (tied to wte), BERT cls.predictions.decoder (tied)",
    accept=_over_a_vocabulary,
)
